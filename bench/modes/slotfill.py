"""slotfill mode: ``Client.submit_many`` onto a private Redis, one worker subprocess pulling
into ``AsyncLLM``. Measured from the first submit to the last result the client has read.

``stream@<ms>`` modes run the same with every job streaming (``stream=True``, the worker's
``stream_interval_ms`` = ms) and the client reading each job through ``Client.stream``: what
streaming costs next to the plain ``slotfill`` mode."""

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
from producer import Client, JobResult, JobStatus, TokenDelta, WaitTimeout
from slotfill.testing.fleet import WorkerProcess

QUEUE = "bench"
CONSUMER = "bench-worker"


def run_slotfill(cfg: BenchConfig, reqs: list[Request], run_dir: Path, redis_url: str,
                 progress: Callable[[str, int, int], None],
                 redis_pid: int | None = None,
                 stream_interval_ms: float | None = None) -> dict[str, Any]:
    name = "slotfill" if stream_interval_ms is None else f"stream{stream_interval_ms:g}ms"
    steps_file = run_dir / f"{name}.steps.jsonl"
    extra: dict[str, Any] = ({} if stream_interval_ms is None
                             else {"stream_interval_ms": stream_interval_ms})
    w = WorkerProcess(redis_url, CONSUMER, run_dir / f"{name}.worker.log", queue=QUEUE,
                      step_log=str(steps_file), engine_hang_seconds=900,
                      **cfg.engine.worker_settings(cfg.model_path), **extra)
    progress("starting worker engine", 0, len(reqs))
    t_load = time.time()
    w.start()
    try:
        w.wait_ready(timeout=1800)
        startup = time.time() - t_load
        assert w.proc is not None
        g = cpu.groups(w.proc.pid, redis_pid, os.getpid())
        return measure(reqs, [w], redis_url, startup, steps_file, progress, g,
                       stream=stream_interval_ms is not None)
    finally:
        w.stop()


def measure(reqs: list[Request], workers: list[WorkerProcess], redis_url: str,
            startup: float, steps_file: Path | None, progress: Callable[[str, int, int], None],
            cpu_groups: dict[str, list[Any]], stream: bool = False) -> dict[str, Any]:
    """Submit every request at once, wait for every result (``stream``: every job streams and
    is read through its token stream); per-request records carry the worker that ran it."""
    r = redis.Redis.from_url(redis_url)
    client = Client.from_url(redis_url, queue=QUEUE, max_pending=max(100_000, 2 * len(reqs)))
    bodies = [{**q.job(), "stream": True} if stream else q.job() for q in reqs]
    deltas = 0
    before = command_calls(r)
    c0 = cpu.snapshot(cpu_groups)
    t0 = time.time()
    ids = client.submit_many(bodies)
    t_submitted = time.time()
    results = []
    for n, job_id in enumerate(ids):
        if stream:
            res, k = _read_stream(client, job_id, workers)
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
                        "prompt_tokens": len(q.prompt),
                        "output_tokens": res.usage.completion_tokens,
                        "submitted": t.queued_at, "started": t.started_at, "scheduled": None,
                        "first_token": t.first_token_at, "finished": t.finished_at})
    client.close()
    r.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "steps_file": str(steps_file) if steps_file else None,
            "extra": {"submit_many_s": t_submitted - t0, "failed": failed, "cpu_s": cpu_s,
                      "redis": per_job(delta(before, after), len(ids)),
                      **({"stream": _stream_figures(deltas, results)} if stream else {})}}


def _check_alive(workers: list[WorkerProcess]) -> None:
    for w in workers:
        if w.proc is not None and w.proc.poll() is not None:
            raise RuntimeError(f"worker {w.consumer} exited {w.proc.returncode}:\n{w.tail()}")


def _wait(client: Client, job_id: str, workers: list[WorkerProcess]) -> JobResult:
    while True:
        try:
            return client.wait(job_id, timeout=5.0)
        except WaitTimeout:
            _check_alive(workers)


def _read_stream(client: Client, job_id: str, workers: list[WorkerProcess]
                 ) -> tuple[JobResult, int]:
    """The job's result and how many deltas its stream carried; the text read from the
    stream must be the result's (else the bench reports a broken stream, not a speed)."""
    text: list[str] = []
    ids: list[int] = []
    after = "0-0"
    while True:
        try:
            for event in client.stream(job_id, after=after, timeout=5.0):
                if isinstance(event, TokenDelta):
                    text.append(event.text)
                    ids.extend(event.token_ids)
                    after = event.entry_id
                elif isinstance(event, JobResult):
                    # Without a tokenizer (the GPU bench) the output is token ids only.
                    if event.ok and ("".join(text), ids if not event.text else None) != (
                            event.text, event.token_ids):
                        raise RuntimeError(f"job {job_id}: streamed output differs from the "
                                           "result")
                    return event, len(text)
                else:  # restarted: the new attempt's output follows
                    text.clear()
                    ids.clear()
        except WaitTimeout:
            _check_alive(workers)


def _stream_figures(deltas: int, results: list[JobResult]) -> dict[str, Any]:
    tokens = sum(r.usage.completion_tokens for r in results)
    return {"deltas": deltas, "deltas_per_job": deltas / max(1, len(results)),
            "tokens_per_delta": tokens / max(1, deltas)}
