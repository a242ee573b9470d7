"""What a worker whose engine died leaves in Redis before it exits: the jobs that were inside
the engine, reported as evidence for the poison rule (``engine_crash``; charged to a job only
when it was alone inside), and every other held entry handed back for a peer's next sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from worker.claim import ClaimedJob
from worker.store import WorkerStore

CRASH_REPORT_TIMEOUT_S = 3.0
"""Longest wait for each of the two writes: the worker exits either way."""


async def report_crash(store: WorkerStore, lease_s: float, inside: Sequence[ClaimedJob],
                       waiting: Sequence[ClaimedJob]) -> int:
    """Entries given back. Raises what Redis raises (or ``asyncio.TimeoutError``): without
    Redis they are reclaimed after the lease anyway, unreported (no evidence against any)."""
    n = await asyncio.wait_for(store.release(inside, lease_s, "engine_crash",
                                             alone=len(inside) == 1), CRASH_REPORT_TIMEOUT_S)
    n += await asyncio.wait_for(store.release(waiting, lease_s, "handed_back"),
                                CRASH_REPORT_TIMEOUT_S)
    return n
