"""slotfill mode: ``Client.submit_many`` onto a private Redis, one worker subprocess pulling
into its engine (``AsyncLLM``, or the simulated one with ``--engine sim``). Measured from the
first submit to the last result the client has read. :func:`measure` is shared with the
stream and fleet modes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import cpu
from bench.config import BenchConfig
from bench.redis_stats import command_calls, delta, per_job
from bench.workload import Request
from producer import Client, JobResult, JobStatus, WaitTimeout
from slotfill.testing.fleet import WorkerProcess

QUEUE = "bench"
CONSUMER = "bench-worker"

Reader = Callable[[Client, str, list[WorkerProcess]], tuple[JobResult, int]]
"""Reads one job to its end: the result, and how many token deltas its stream carried."""


def run_slotfill(cfg: BenchConfig, reqs: list[Request], run_dir: Path, redis_url: str,
                 progress: Callable[[str, int, int], None],
                 redis_pid: int | None = None, name: str = "slotfill",
                 extra: dict[str, Any] | None = None,
                 reader: Reader | None = None) -> dict[str, Any]:
    """One worker; ``extra``: more worker settings; ``reader``: every job streams and is
    read with it (bench/modes/stream.py)."""
    steps_file = run_dir / f"{name}.steps.jsonl"
    w = WorkerProcess(redis_url, CONSUMER, run_dir / f"{name}.worker.log", queue=QUEUE,
                      step_log=str(steps_file), engine_hang_seconds=900,
                      **cfg.engine.worker_settings(cfg.model_path), **(extra or {}))
    progress("starting worker engine", 0, len(reqs))
    t_load = time.time()
    w.start()
    try:
        w.wait_ready(timeout=1800)
        startup = time.time() - t_load
        assert w.proc is not None
        g = cpu.groups(w.proc.pid, redis_pid, os.getpid())
        return measure(reqs, [w], redis_url, startup, steps_file, progress, g, reader)
    finally:
        w.stop()


def measure(reqs: list[Request], workers: list[WorkerProcess], redis_url: str,
            startup: float, steps_file: Path | None, progress: Callable[[str, int, int], None],
            cpu_groups: dict[str, list[Any]], reader: Reader | None = None) -> dict[str, Any]:
    """Submit every request at once, wait for every result (``reader``: every job streams and
    is read with it); per-request records carry the worker that ran it."""
    r = redis.Redis.from_url(redis_url)
    client = Client.from_url(redis_url, queue=QUEUE)
    client.configure_queue(max_pending=max(100_000, 2 * len(reqs)))
    bodies = [{**q.job(), "stream": True} if reader else q.job() for q in reqs]
    deltas = 0
    before = command_calls(r)
    c0 = cpu.snapshot(cpu_groups)
    t0 = time.time()
    ids = client.submit_many(bodies)
    t_submitted = time.time()
    results = []
    for n, job_id in enumerate(ids):
        if reader is not None:
            res, k = reader(client, job_id, workers)
            results.append(res)
            deltas += k
        else:
            results.append(_wait(client, job_id, workers))
        if n % 20 == 0:
            progress("running", n + 1, len(ids))
    t1 = time.time()
    cpu_s = cpu.delta(c0, cpu.snapshot(cpu_groups))
    after = command_calls(r)
    progress("running", len(ids), len(ids))
    records = []
    failed = []
    for q, res in zip(reqs, results, strict=True):
        if res.status is not JobStatus.succeeded:
            failed.append({"index": q.index, "status": res.status.value,
                           "error": res.error.model_dump() if res.error else None})
            continue
        t = res.timings
        records.append({"index": q.index, "worker": res.worker,
                        "prompt_tokens": q.n_prompt,
                        "output_tokens": res.usage.completion_tokens,
                        "submitted": t.queued_at, "started": t.started_at, "scheduled": None,
                        "first_token": t.first_token_at, "finished": t.finished_at})
    client.close()
    r.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "steps_file": str(steps_file) if steps_file else None,
            "extra": {"submit_many_s": t_submitted - t0, "failed": failed, "cpu_s": cpu_s,
                      "redis": per_job(delta(before, after), len(ids)),
                      **({"stream_deltas": deltas} if reader else {})}}


def check_alive(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if w.proc is not None and w.proc.poll() is not None:
            raise RuntimeError(f"worker {w.consumer} exited {w.proc.returncode}:\n{w.tail()}")


def _wait(client: Client, job_id: str, workers: list[WorkerProcess]) -> JobResult:
    while True:
        try:
            return client.wait(job_id, timeout=5.0)
        except WaitTimeout:
            check_alive(workers)
