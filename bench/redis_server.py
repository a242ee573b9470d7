"""The bench's private redis-server: ``RedisServer`` in its own session with autogroup nice.

``RedisServer`` renices its redis-server to -10 so the busy-polling CPU engine cannot starve
it. With ``kernel.sched_autogroup_enabled=1`` (the default on many distributions, and on the
2-core box this bench was written on) nice only ranks processes inside one session's
autogroup, and the worker with its engine runs in a session of its own: measured here while
another session's engine also ran, redis-server spent 8.3 s of a 17 s run waiting for a CPU
and the worker's Redis calls stalled for up to ~1 s (result writes p99 460-900 ms); in its own
session at autogroup nice -10 the same calls had a p99 of ~14 ms. With no other busy session
on the box the difference was within run-to-run noise. ``--no-redis-boost`` turns it off; the
results record what applied.
"""

from __future__ import annotations

import os
from pathlib import Path

from slotfill.testing.redis_server import RedisServer


def autogroup_enabled() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def bench_redis(workdir: str, boost: bool = True) -> RedisServer:
    """A private redis-server for one bench run (not started)."""
    return RedisServer(workdir=workdir, priority_boost=boost, own_session=boost)


def scheduling(server: RedisServer) -> dict[str, object]:
    """What the server's process actually got (for the results file)."""
    out: dict[str, object] = {"autogroup_enabled": autogroup_enabled(),
                              "boost": server.priority_boost}
    if server.proc is None:
        return out
    try:
        out["redis_autogroup"] = Path(f"/proc/{server.proc.pid}/autogroup").read_text().strip()
    except OSError:
        pass
    try:
        out["redis_nice"] = os.getpriority(os.PRIO_PROCESS, server.proc.pid)
    except OSError:
        pass
    return out
