"""The Celery baseline: the way people serve LLM jobs from a task queue today.

A Celery worker (``--pool solo --concurrency 1``: nothing forks after the engine starts; default
prefetch) loads one ``vllm.LLM`` per worker process when it starts, and its task runs
``LLM.generate`` on what the task carries: one request (per-request mode) or a static batch
of k requests (batch mode). The broker is Redis (the bench's private redis-server, its own
db number). The run directory and mode come from ``SLOTFILL_BENCH_RUN_DIR`` /
``SLOTFILL_BENCH_MODE``; the broker and result backend from ``SLOTFILL_BENCH_BROKER`` /
``SLOTFILL_BENCH_BACKEND``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals

TASK = "slotfill_bench.generate"
QUEUE = "slotfill-bench"

app = Celery("slotfill_bench")
app.conf.update(
    broker_url=os.environ.get("SLOTFILL_BENCH_BROKER", "redis://127.0.0.1:6379/1"),
    result_backend=os.environ.get("SLOTFILL_BENCH_BACKEND", "redis://127.0.0.1:6379/2"),
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_default_queue=QUEUE, worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_engine: dict[str, Any] = {}


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _load_engine(**_: Any) -> None:
    """Once per worker process, before it consumes: the engine (~30 s on a small CPU box)."""
    from bench.config import BenchConfig
    from bench.engines import StepWriter, build_llm

    run_dir = Path(os.environ["SLOTFILL_BENCH_RUN_DIR"])
    mode = os.environ["SLOTFILL_BENCH_MODE"]
    cfg = BenchConfig.load(run_dir / "config.json")
    t = time.time()
    steps = StepWriter(run_dir / f"{mode}.steps.jsonl")
    _engine.update(cfg=cfg, llm=build_llm(cfg, steps), steps=steps, startup=time.time() - t,
                   ready=run_dir / f"{mode}.celery-ready")


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _ready(**_: Any) -> None:
    path = _engine.get("ready")
    if path is not None:
        path.write_text(str(_engine["startup"]))


@app.task(name=TASK)  # type: ignore[untyped-decorator]
def generate(batch: list[dict[str, Any]], submitted: float) -> list[dict[str, Any]]:
    """Run the requests of one task to completion with ``LLM.generate``."""
    from bench.engines import output_record, sampling_params, token_prompt

    cfg, llm = _engine["cfg"], _engine["llm"]
    started = time.time()
    outs = llm.generate([token_prompt(b["prompt"]) for b in batch],
                        [sampling_params(cfg, b["max_tokens"]) for b in batch], use_tqdm=False)
    done = time.time()
    return [output_record(o, b["index"], submitted, started, done)
            for o, b in zip(outs, batch, strict=True)]
