"""Where a refill's time goes (the bench's breakdown of refill latency; on with ``step_log``).

A refill is the time from a job leaving the engine to its replacement being handed to the
engine (bench/analysis.py). Its parts, as the pull loop sees them, go to one JSON line per
read of new jobs, beside the step log (:func:`read_log_path`):

* ``t_free``: when the earliest job that left the engine since the previous read was issued
  left it (None: the read had another cause: a step that let admission take more, a
  reclaim, the first read), and ``behind``: whether a read was already on its way to Redis
  then (the replacement waits for that read's reply, then for its own);
* ``t_issue`` / ``t_back``: the read's round trip as the loop saw it (a slow reply and a
  busy loop look alike here, hence the next two);
* ``lag_ms``: the event loop's worst lateness over the last ``LAG_WINDOW_S`` (a probe that
  sleeps ``LAG_PROBE_S`` and measures how late it wakes: the loop busy with engine outputs,
  result writes, JSON);
* ``gc_ms``: time in the garbage collector since the previous read;
* ``waiting`` / ``running`` / ``held``: the engine's queue at its last step and the jobs held
  (``waiting`` 0 with free slots: the ready queue ran dry, a refill the engine waits for).

Only the bench turns it on: its cost is a few timestamps per read and a 200 Hz probe task.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import deque
from pathlib import Path
from typing import Any

LAG_PROBE_S = 0.005
"""The loop-lag probe's sleep."""
LAG_WINDOW_S = 0.1
"""``lag_ms`` is the worst lateness of the probe over this long."""


def read_log_path(step_log: str | Path) -> Path:
    """The read log beside a step log: ``x.steps.jsonl`` → ``x.reads.jsonl``."""
    p = str(step_log)
    return Path(p.removesuffix(".steps.jsonl") + ".reads.jsonl")


class RefillTrace:
    def __init__(self, path: str | Path) -> None:
        # Opened once at start-up, before any job runs; line-buffered writes are cheap.
        self._file = open(path, "a", buffering=1)  # noqa: SIM115
        self._t_free: float | None = None
        self._behind = False
        self._reading = False
        self._lags: deque[tuple[float, float]] = deque()
        self._gc_s = 0.0
        self._gc_start = 0.0
        self._probe: asyncio.Task[None] | None = None
        gc.callbacks.append(self._on_gc)

    def start(self) -> None:
        """Start the loop-lag probe (on the running loop)."""
        self._probe = asyncio.create_task(self._probe_loop(), name="refill-trace-lag")

    def freed(self) -> None:
        """A job left the engine (its slot is free)."""
        if self._t_free is None:
            self._t_free = time.time()
            self._behind = self._reading

    def issued(self) -> tuple[float, float | None, bool]:
        """A read is issued now: (now, the free it answers, whether it came behind a read)."""
        now = time.time()
        out = (now, self._t_free, self._behind)
        self._t_free, self._behind, self._reading = None, False, True
        return out

    def read(self, issued: tuple[float, float | None, bool], want: int, got: int,
             held: int, running: int, waiting: int) -> None:
        """The read issued at ``issued`` returned ``got`` of ``want`` jobs."""
        self._reading = False
        t_issue, t_free, behind = issued
        gc_s, self._gc_s = self._gc_s, 0.0
        self._file.write(json.dumps({
            "t_free": t_free, "behind": behind, "t_issue": t_issue, "t_back": time.time(),
            "want": want, "got": got, "held": held, "running": running, "waiting": waiting,
            "lag_ms": round(self.lag_s() * 1000, 3), "gc_ms": round(gc_s * 1000, 3)}) + "\n")

    def lag_s(self) -> float:
        cutoff = time.monotonic() - LAG_WINDOW_S
        while self._lags and self._lags[0][0] < cutoff:
            self._lags.popleft()
        return max((lag for _, lag in self._lags), default=0.0)

    async def _probe_loop(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            now = time.monotonic()
            self._lags.append((now, max(0.0, now - t - LAG_PROBE_S)))

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gc_s += time.perf_counter() - self._gc_start

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._file.close()
