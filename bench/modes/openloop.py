"""The open-loop driver every live-load mode shares: send each request at its arrival time
(bench/arrivals.py) whatever is still running, read it to its end, and time it at the client.

A mode supplies ``send(request, sample)``: submit one request (streaming), call
``sample.tokens(n)`` as each piece of output arrives, and set ``sample.status`` (``ok`` or
what went wrong) when it ends. The driver owns the clock: a request's latencies run from
the moment the driver handed it to ``send`` (``sent``), and how late that was against its
arrival time (``lag``) is recorded, so an overloaded load generator shows instead of passing
as a slow system.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.workload import Request


@dataclass
class Sample:
    """One request of a live-load run, as the client saw it (Unix seconds)."""

    index: int
    arrival: float
    """Offset of its arrival from the level's start (the schedule)."""
    expected_tokens: int
    sent: float = 0.0
    first: float | None = None
    """First output token read by the client."""
    last: float | None = None
    end: float | None = None
    """Terminal event read (the result, or the stream's end)."""
    n_tokens: int = 0
    chunks: int = 0
    max_gap: float = 0.0
    """Longest wait between two pieces of output (coalescing and stalls show here)."""
    status: str = "pending"
    error: str = ""
    queue_wait: float | None = None
    """Submitted → taken by the engine's feeder, where the system reports it (slotfill)."""
    results: int = 0
    """Terminal results read for this request (more than one = a duplicate)."""
    restarts: int = 0
    lag: float = 0.0
    """How late the driver sent it against its arrival time."""

    def tokens(self, n: int, now: float | None = None) -> None:
        if n <= 0:
            return
        now = time.time() if now is None else now
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.n_tokens += n
        self.chunks += 1

    def finish(self, status: str, error: str = "") -> None:
        self.end = time.time()
        self.results += 1
        if self.status == "pending":
            self.status, self.error = status, error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Send = Callable[[Request, Sample], Awaitable[None]]


@dataclass
class LevelRun:
    """What the driver measured for one level."""

    t0: float
    samples: list[Sample]
    in_flight: list[tuple[float, int]] = field(default_factory=list)
    """(seconds from t0, requests sent and not ended), sampled every ``sample_s``."""


async def drive(reqs: list[Request], arrivals: list[float], send: Send,
                drain_timeout: float, sample_s: float = 0.25) -> LevelRun:
    """Send ``reqs[i]`` at ``arrivals[i]`` seconds, then wait up to ``drain_timeout`` s after
    the last arrival for every request to end; those still running then are cancelled and
    counted ``lost``."""
    if len(reqs) < len(arrivals):
        raise ValueError("fewer requests than arrivals")
    t0 = time.time() + 0.05
    run = LevelRun(t0, [])
    tasks: set[asyncio.Task[None]] = set()
    pending: list[asyncio.Task[None]] = []

    async def one(req: Request, s: Sample) -> None:
        try:
            await send(req, s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a transport error is a result to count, not a crash
            s.finish("error", f"{type(e).__name__}: {e}"[:300])
        if s.end is None:
            s.finish("error", "ended without a result")

    async def watch() -> None:
        while True:
            run.in_flight.append((time.time() - t0, sum(1 for s in run.samples
                                                         if s.end is None)))
            await asyncio.sleep(sample_s)

    watcher = asyncio.create_task(watch())
    for req, at in zip(reqs, arrivals, strict=False):
        delay = t0 + at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        s = Sample(req.index, at, req.max_tokens, sent=time.time())
        s.lag = s.sent - (t0 + at)
        run.samples.append(s)
        task = asyncio.create_task(one(req, s))
        tasks.add(task)  # keep a reference until it ends
        task.add_done_callback(tasks.discard)
        pending.append(task)
    _done, late = await asyncio.wait(pending, timeout=max(
        0.1, t0 + arrivals[-1] + drain_timeout - time.time()))
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for s in run.samples:
        if s.end is None:
            s.status, s.error = "lost", f"no result within {drain_timeout:g} s of the last send"
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    return run
