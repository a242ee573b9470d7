"""Cancelling tasks that may be inside a redis-py asyncio command, and knowing they ended."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_S = 0.02
"""How long a cancelled task gets to end before it is cancelled again."""


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and return once every one has ended; their errors stay in the tasks,
    marked as retrieved (asyncio does not report them as never retrieved).

    The cancel is repeated until it takes: on Python before 3.12, ``asyncio.wait_for``,
    which redis-py's asyncio connection puts around every send when a socket timeout is
    set, drops a cancel that arrives just as its send completes (CPython gh-86296). The task
    then ran on into its next command: a worker's blocking ``XREAD`` of the other shards
    held the pull loop for its whole 2 s block, measured here on 3.11 (a job on a shard the
    worker did not wake on waited ~2.1 s instead of ~0.03 s)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    for t in pending:  # the caller may itself be cancelled while it waits here
        t.add_done_callback(_retrieve)
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
    for t in tasks:
        _retrieve(t)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of a task nobody may await any more as seen (no "exception was never
    retrieved" once Redis goes away under it)."""
    if not task.cancelled():
        task.exception()
