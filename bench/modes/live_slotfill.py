"""Live-load mode ``slotfill``: the client → Redis → worker path under open-loop arrivals.

One ``slotfill worker`` subprocess (the bench's engine settings, ``WorkerProcess``) on the
bench's private Redis; each request is one ``AsyncClient.submit`` of a streaming job, read
with ``AsyncClient.stream`` to its result, so time to first token is what a backend using
the client sees. Queue wait per request: the result's ``started_at − queued_at`` (the job
taken from Redis into the engine's feeder). The gateway mode (live_gateway.py) reuses this
worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis.asyncio as aioredis

from bench.config import BenchConfig
from bench.modes.openloop import Sample, Send
from bench.workload import Request
from producer import (
    AsyncClient,
    Client,
    ClientSettings,
    JobResult,
    Moved,
    Restarted,
    TokenDelta,
)
from slotfill.testing.fleet import WorkerProcess

QUEUE = "live"
CONSUMER = "live-worker"


@contextmanager
def worker(cfg: BenchConfig, redis_url: str, run_dir: Path, name: str = "slotfill",
           ready_timeout: float = 1800) -> Iterator[WorkerProcess]:
    """One worker on ``QUEUE`` with the run's engine settings, loaded and pulling."""
    Client.from_url(redis_url, queue=QUEUE).configure_queue(max_pending=1_000_000)
    w = WorkerProcess(redis_url, CONSUMER, run_dir / f"live-{name}.worker.log", queue=QUEUE,
                      engine_hang_seconds=900, **cfg.engine.worker_settings(cfg.model_path))
    w.start()
    try:
        w.wait_ready(timeout=ready_timeout)
        yield w
    finally:
        w.stop()


MAX_CONNECTIONS = 100_000
"""Every request in flight holds one connection (its blocking stream read); redis-py 8's
asyncio pool allows 100 by default and then fails with "Too many connections" (the gateway,
which keeps that default, answered 503 past ~100 concurrent streams in the CPU burst)."""


def client(redis_url: str) -> AsyncClient:
    """The bench's asyncio client: one connection per request in flight, no cap."""
    settings = ClientSettings(redis_url=redis_url, queue=QUEUE)
    # The bench's private Redis is a plain URL: redis-py's own from_url is what the client's
    # connect_async does for it.
    return AsyncClient(aioredis.Redis.from_url(redis_url, max_connections=MAX_CONNECTIONS),
                       settings)


def sender(client: AsyncClient, w: WorkerProcess, timeout: float) -> Send:
    """``send`` for the open-loop driver: submit one streaming job and read it to its end."""

    async def send(req: Request, s: Sample) -> None:
        job = await client.submit(request={**req.job(), "stream": True})
        async for ev in client.stream(job.id, timeout=timeout):
            if isinstance(ev, TokenDelta):
                s.tokens(len(ev.token_ids))
            elif isinstance(ev, Restarted):
                # The new attempt's output follows from its first token: count only that.
                s.restarts += 1
                s.n_tokens = 0
            elif isinstance(ev, Moved):
                s.restarts += 1
            elif isinstance(ev, JobResult):
                _record_result(s, ev)
        if s.end is None and w.proc is not None and w.proc.poll() is not None:
            s.finish("error", f"worker exited {w.proc.returncode}")

    return send


def _record_result(s: Sample, res: JobResult) -> None:
    t = res.timings
    if t.started_at is not None and t.queued_at is not None:
        s.queue_wait = t.started_at - t.queued_at
    if res.ok:
        s.finish("ok")
    else:
        s.finish("error", f"{res.error.code}: {res.error.message}"[:300] if res.error
                 else res.status.value)

