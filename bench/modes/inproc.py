"""The engine-only modes, each run in a fresh process: ``python -m bench.inproc MODE RUN_DIR``.

- ``offline``: ``LLM.generate`` over every request at once: the engine's own limit.
- ``asyncio``: an ``AsyncLLM`` fed from an in-process list by a feeder that holds
  ``max_num_seqs + headroom`` requests in flight (the worker's capacity), no Redis: the
  difference to slotfill is what Redis (and the worker's bookkeeping) costs.

Writes ``RUN_DIR/MODE.json`` (timings per request), ``RUN_DIR/MODE.steps.jsonl`` (one line per
engine step) and ``RUN_DIR/MODE.progress`` (``done total``) while it runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench.config import BenchConfig
from bench.workload import Request, make_workload


def _progress(run_dir: Path, mode: str, done: int, total: int) -> None:
    tmp = run_dir / f"{mode}.progress.tmp"
    tmp.write_text(f"{done} {total}")
    tmp.replace(run_dir / f"{mode}.progress")


def run_offline(cfg: BenchConfig, reqs: list[Request], run_dir: Path) -> dict[str, Any]:
    from bench.engines import StepWriter, build_llm, output_record, sampling_params, token_prompt

    t_load = time.time()
    steps = StepWriter(run_dir / "offline.steps.jsonl")
    llm = build_llm(cfg, steps)
    startup = time.time() - t_load
    prompts = [token_prompt(r.prompt) for r in reqs]
    params = [sampling_params(cfg, r.max_tokens) for r in reqs]
    _progress(run_dir, "offline", 0, len(reqs))
    g = cpu.groups(os.getpid())
    c0 = cpu.snapshot(g)
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t1 = time.time()
    cpu_s = cpu.delta(c0, cpu.snapshot(g))
    records = [output_record(o, r.index, t0, t0) for o, r in zip(outs, reqs, strict=True)]
    _progress(run_dir, "offline", len(reqs), len(reqs))
    steps.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "extra": {"cpu_s": cpu_s}}


async def _feed(cfg: BenchConfig, reqs: list[Request], run_dir: Path) -> dict[str, Any]:
    from bench.engines import (
        StepWriter,
        async_input_builder,
        build_async_llm,
        output_record,
        sampling_params,
    )

    t_load = time.time()
    steps = StepWriter(run_dir / "asyncio.steps.jsonl")
    llm = build_async_llm(cfg, steps)
    startup = time.time() - t_load
    make_input = async_input_builder()
    capacity = cfg.engine.max_num_seqs + cfg.engine.headroom
    slots = asyncio.Semaphore(capacity)
    records: list[dict[str, Any]] = []
    total = len(reqs)

    async def one(r: Request, submitted: float) -> None:
        try:
            started = time.time()
            final = None
            async for out in llm.generate(make_input(r.prompt),
                                          sampling_params(cfg, r.max_tokens, final_only=True),
                                          request_id=f"bench-{r.index}"):
                final = out
            assert final is not None
            records.append(output_record(final, r.index, submitted, started, time.time()))
            if len(records) % 50 == 0:
                _progress(run_dir, "asyncio", len(records), total)
        finally:
            slots.release()

    _progress(run_dir, "asyncio", 0, total)
    g = cpu.groups(os.getpid())
    c0 = cpu.snapshot(g)
    t0 = time.time()
    tasks = []
    for r in reqs:  # every request is "submitted" at t0 and waits here for a place
        await slots.acquire()
        tasks.append(asyncio.create_task(one(r, t0)))
    await asyncio.gather(*tasks)
    t1 = time.time()
    cpu_s = cpu.delta(c0, cpu.snapshot(g))
    _progress(run_dir, "asyncio", total, total)
    llm.shutdown()
    steps.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "extra": {"capacity": capacity, "cpu_s": cpu_s}}


def main(argv: list[str]) -> int:
    mode, run_dir = argv[0], Path(argv[1])
    cfg = BenchConfig.load(run_dir / "config.json")
    from bench.config import model_vocab_size

    reqs = make_workload(cfg.workload, cfg.workload.vocab_size or model_vocab_size(cfg.model_path))
    if mode == "offline":
        result = run_offline(cfg, reqs, run_dir)
    elif mode == "asyncio":
        result = asyncio.run(_feed(cfg, reqs, run_dir))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["mode"] = mode
    result["steps_file"] = str(run_dir / f"{mode}.steps.jsonl")
    (run_dir / f"{mode}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
