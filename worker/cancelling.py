"""Cancelling tasks that may be inside a redis-py asyncio command, and knowing they ended."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

RECANCEL_S = 0.02
"""How long a cancelled task gets to end before it is cancelled again: for tasks that only
wait on Redis (nothing to clean up)."""
CLEANUP_S = 1.0
"""The same for tasks that clean up when cancelled (a job aborting its engine request, a
listener closing its connection): a second cancel would cut that short."""


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]],
                          every_s: float = RECANCEL_S) -> None:
    """Cancel ``tasks`` and return once every one has ended; their errors stay in the tasks,
    marked as retrieved (asyncio does not report them as never retrieved). A cancel of the
    caller meanwhile is raised once they have ended. Those still running are cancelled
    again every ``every_s``.

    The cancel is repeated until it takes: on Python before 3.12, ``asyncio.wait_for``,
    which redis-py's asyncio connection puts around every send when a socket timeout is
    set, drops a cancel that arrives just as its send completes (CPython gh-86296). The task
    then ran on into its next command: a worker's blocking ``XREAD`` of the other shards
    held the pull loop for its whole 2 s block, measured here on 3.11 (a job on a shard the
    worker did not wake on waited ~2.1 s instead of ~0.03 s)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    interrupted = False
    while pending:
        for t in pending:
            t.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=every_s)
        except asyncio.CancelledError:
            # The caller is cancelled too (a worker stopping): end the tasks first, as
            # ``asyncio.gather`` would by passing the cancel on; else one left running dies
            # with the event loop, inside redis-py ("coroutine ignored GeneratorExit").
            interrupted = True
    for t in tasks:
        if not t.cancelled():
            t.exception()  # seen: not reported as "exception was never retrieved"
    if interrupted:
        raise asyncio.CancelledError
