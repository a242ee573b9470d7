"""The bench's private redis-server, with a CPU boost that also works under autogroup.

``worker.redis_server.RedisServer`` renices its redis-server to -10 so the busy-polling CPU
engine cannot starve it. On Linux with ``kernel.sched_autogroup_enabled=1`` (the default on
many distributions, and on the 2-core box this bench was written on) nice values only rank
processes *inside* one session's autogroup; between sessions the scheduler shares CPU per
group. redis-server stays in its parent's session, the worker and its engine processes run in
their own, so the renice does not help once several sessions are busy: measured here while
another session's engine also ran on the box, redis-server spent 8.3 s of a 17 s run waiting
for a CPU and the worker's Redis calls stalled for up to ~1 s (result writes p99 460-900 ms);
with its own session at autogroup nice -10 the same calls had a p99 of ~14 ms. With no other
busy session on the box the difference was within run-to-run noise (slotfill/offline 0.90
without the boost, 0.80-0.93 with it, in single runs).

This module applies that boost for the bench's own Redis (recorded in the results) until
``RedisServer`` does it itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import slotfill.testing.redis_server as redis_server_module
from slotfill.testing.redis_server import RedisServer

AUTOGROUP_NICE = -10


def autogroup_enabled() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def _boost_own_session() -> None:  # runs in the child between fork and exec
    os.setsid()  # a new session: its own autogroup
    try:
        os.nice(-10)
    except OSError:
        pass
    try:
        Path("/proc/self/autogroup").write_text(str(AUTOGROUP_NICE))
    except OSError:
        pass  # no autogroup, or not permitted


class BenchRedisServer(RedisServer):
    """``RedisServer`` whose child gets its own session and autogroup nice (see above)."""

    def start(self, timeout: float = 10.0) -> BenchRedisServer:
        if not self.priority_boost:
            super().start(timeout)
            return self
        original = redis_server_module._boost
        redis_server_module._boost = _boost_own_session
        try:
            super().start(timeout)
        finally:
            redis_server_module._boost = original
        return self

    def __enter__(self) -> BenchRedisServer:
        return self.start()

    def scheduling(self) -> dict[str, object]:
        """What the child actually got (for the results file)."""
        out: dict[str, object] = {"autogroup_enabled": autogroup_enabled(),
                                  "boost": self.priority_boost}
        if self.proc is None:
            return out
        try:
            out["redis_autogroup"] = Path(f"/proc/{self.proc.pid}/autogroup").read_text().strip()
        except OSError:
            pass
        try:
            out["redis_nice"] = os.getpriority(os.PRIO_PROCESS, self.proc.pid)
        except OSError:
            pass
        return out
