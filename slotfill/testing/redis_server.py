"""Start a private ``redis-server`` on a free port in a temp dir (demo, tests, bench)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.exceptions import RedisClusterException

from producer.connection import connect, masters

LOWEST_PORT = 10000


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (net.ipv4.ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere a guess


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (any address: a metrics endpoint binds 0.0.0.0)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


PORT_PERIOD = 10000
"""Ports are shared out among pytest-xdist workers by their offset in a period this wide: a
Redis Cluster node's bus port (its port + 10000) then belongs to the same worker as the node."""


def _xdist_share() -> tuple[int, int]:
    """``(n, m)``: this process is pytest-xdist worker ``gw<n>`` of ``m`` (its children inherit
    the variables xdist sets); ``(0, 1)`` outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    n = worker.removeprefix("gw")
    if n.isdigit() and count.isdigit() and int(n) < int(count):
        return int(n), int(count)
    return 0, 1


def candidate_port(below: int) -> int:
    """A random port from ``LOWEST_PORT`` up to ``below`` (exclusive, when the range leaves
    room) that is this process's to try. Under pytest-xdist each worker draws from its own
    share: the check that a port is free and the bind that takes it are not one step, and two
    workers checking the same port at once would both start a server there."""
    n, m = _xdist_share()
    offset = random.randrange(n * PORT_PERIOD // m, (n + 1) * PORT_PERIOD // m)
    laps = max(1, -(-(below - LOWEST_PORT - offset) // PORT_PERIOD))
    return LOWEST_PORT + offset + PORT_PERIOD * random.randrange(laps)


def free_port() -> int:
    """A free port to listen on, below the kernel's ephemeral range. A port that ``bind(0)``
    hands out comes from the range every outgoing connection draws its source port from, so
    a client connecting elsewhere could take it before the server meant to listen there
    binds it: a race that grows with the connections a busy box (a parallel test run)
    opens."""
    for _ in range(200):
        port = candidate_port(ephemeral_low())
        if port_is_free(port):
            return port
    with socket.socket() as s:  # below the range, nothing free: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _boost() -> None:
    # On a small box the CPU engine busy-polls every core; measured on 2 cores, a redis-server
    # at the default priority went unscheduled for up to 0.5 s and the feeder's refills with
    # it. Production Redis runs on its own cores; this private one asks for a share.
    try:
        os.nice(-10)
    except OSError:
        pass  # not permitted (not root): run at the default priority


AUTOGROUP_NICE = -10


def _boost_own_session() -> None:
    # With kernel.sched_autogroup_enabled=1 nice only ranks processes inside one session's
    # autogroup; between sessions the scheduler shares the CPU per group. Measured on the
    # 2-core box while another session's engine ran, a renice alone left redis-server 8.3 s
    # of a 17 s run waiting for a CPU (the worker's Redis calls stalled up to ~1 s); in its
    # own session at autogroup nice -10 those calls had a p99 of ~14 ms.
    os.setsid()
    _boost()
    try:
        Path("/proc/self/autogroup").write_text(str(AUTOGROUP_NICE))
    except OSError:
        pass  # no autogroup, or not permitted


class RedisServer:
    """A ``redis-server`` child process. ``appendfsync``: ``always``/``everysec``/``no``;
    None turns AOF off. Extra config lines go in ``extra``. ``own_session`` (with
    ``priority_boost``): the child also gets its own session and autogroup nice, so the
    boost holds against busy processes of other sessions (the bench's setting)."""

    def __init__(self, appendfsync: str | None = "everysec", extra: list[str] | None = None,
                 port: int | None = None, workdir: str | None = None,
                 priority_boost: bool = True, own_session: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server not found on PATH: install it (Debian/Ubuntu: apt-get install "
                "redis-server; macOS: brew install redis) or set SLOTFILL_REDIS_URL")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="slotfill-redis-"))
        self.appendfsync = appendfsync
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.priority_boost = priority_boost
        self.own_session = own_session

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _config(self) -> str:
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", "save \"\"",
                 "maxmemory-policy noeviction", "daemonize no",
                 f"logfile {self.dir / 'redis.log'}"]
        if self.appendfsync:
            lines += ["appendonly yes", f"appendfsync {self.appendfsync}"]
        return "\n".join(lines + self.extra) + "\n"

    def start(self, timeout: float = 10.0) -> RedisServer:
        conf = self.dir / "redis.conf"
        conf.write_text(self._config())
        boost = _boost_own_session if self.own_session else _boost
        self.proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL,
                                     preexec_fn=boost if self.priority_boost else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: see {self.dir / 'redis.log'}")
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return self
            except (redis.ConnectionError, redis.AuthenticationError):
                time.sleep(0.05)
            except redis.ResponseError:
                return self  # running; needs AUTH
        raise RuntimeError("redis-server did not start in time")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (no shutdown save)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unblock_stream_reads(url: str) -> int:
    """End every blocking ``XREAD`` on this server as if its timeout had passed (``CLIENT
    UNBLOCK``). A worker told to stop cancels its idle blocking read, and redis-py then
    waits for the reply: up to the block time (2 s) per stop. This makes stopping fast; the
    reader sees an ordinary timeout and reads again if it is still running."""
    r = connect(url)
    try:
        n = 0
        for node in masters(r):  # every master of a cluster; the master of a Sentinel group
            ids = [int(c["id"]) for c in node.client_list() if c.get("cmd") == "xread"
                   and "b" in c.get("flags", "")]
            n += sum(bool(node.client_unblock(i)) for i in ids)
        return n
    except (redis.RedisError, RedisClusterException):
        return 0  # best effort: the read still ends at its timeout
    finally:
        r.close()
