"""offline mode: ``vllm.LLM.generate`` over every request at once, in a fresh process (see
bench/modes/inproc.py): the engine's own limit, and the base of every ratio. ``offline_split``
(with ``--gpus``): one such process per listed GPU at once, each over its share of the
requests (every k-th): k engines that never share work, the achievable base of a fleet's
scaling (one engine over all N requests has a tail k times shorter relative to its work)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench.config import BenchConfig
from bench.modes.progress import write_progress
from bench.workload import Request


def run_offline(cfg: BenchConfig, reqs: list[Request], run_dir: Path,
                name: str = "offline") -> dict[str, Any]:
    """``name``: the stem of its step log and progress file (one per share of a split run)."""
    from bench.engines import StepWriter, build_llm, output_record, sampling_params, token_prompt

    t_load = time.time()
    steps = StepWriter(run_dir / f"{name}.steps.jsonl")
    llm = build_llm(cfg, steps)
    startup = time.time() - t_load
    prompts = [token_prompt(r.prompt) for r in reqs]
    params = [sampling_params(cfg, r.max_tokens) for r in reqs]
    write_progress(run_dir, name, 0, len(reqs))
    g = cpu.groups(os.getpid())
    c0 = cpu.snapshot(g)
    t0 = time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t1 = time.time()
    cpu_s = cpu.delta(c0, cpu.snapshot(g))
    records = [output_record(o, r.index, t0, t0) for o, r in zip(outs, reqs, strict=True)]
    write_progress(run_dir, name, len(reqs), len(reqs))
    steps.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "extra": {"cpu_s": cpu_s}}
