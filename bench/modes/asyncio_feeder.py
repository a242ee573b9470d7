"""asyncio mode: an ``AsyncLLM`` (built as the worker builds it) fed from an in-process list
by a feeder that holds ``max_num_seqs + headroom`` requests in flight (the worker's fixed
capacity), no Redis, in a fresh process (see bench/modes/inproc.py): slotfill minus this is
what Redis and the worker's bookkeeping cost."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench.config import BenchConfig
from bench.modes.progress import write_progress
from bench.workload import Request


async def run_asyncio(cfg: BenchConfig, reqs: list[Request], run_dir: Path) -> dict[str, Any]:
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
            async for out in llm.generate(r.prompt if isinstance(r.prompt, str)
                                          else make_input(r.prompt),
                                          sampling_params(cfg, r.max_tokens, final_only=True),
                                          request_id=f"bench-{r.index}"):
                final = out
            assert final is not None
            records.append(output_record(final, r.index, submitted, started, time.time()))
            if len(records) % 50 == 0:
                write_progress(run_dir, "asyncio", len(records), total)
        finally:
            slots.release()

    write_progress(run_dir, "asyncio", 0, total)
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
    write_progress(run_dir, "asyncio", total, total)
    llm.shutdown()
    steps.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "extra": {"capacity": capacity, "cpu_s": cpu_s}}
