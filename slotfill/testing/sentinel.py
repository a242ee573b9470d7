"""A loopback Sentinel group for tests: one master, its replicas and three sentinels, each a
``redis-server`` child in its own temp dir on a free port."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from slotfill.testing.redis_server import RedisServer, free_port

SERVICE = "slotfill"
"""The monitored master's name (``redis+sentinel://…/slotfill``)."""


class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``SERVICE``."""

    def __init__(self, master_port: int, workdir: Path, quorum: int = 2,
                 down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        conf = self.dir / "sentinel.conf"
        # Sentinel rewrites its config file (it must be writable): one per process.
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
            f"logfile {self.dir / 'sentinel.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
            f"sentinel failover-timeout {SERVICE} 4000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]) + "\n")
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen([binary, str(conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1.0, decode_responses=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SentinelGroup:
    """Master + ``replicas`` replicas + ``sentinels`` sentinels. ``extra``: config lines for
    every data node (``min-replicas-to-write 1`` and the like)."""

    def __init__(self, replicas: int = 1, sentinels: int = 3,
                 extra: list[str] | None = None, appendfsync: str | None = "everysec") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="slotfill-sentinel-"))
        self.extra = list(extra or [])
        self.appendfsync = appendfsync
        self.master = self._node("n0")
        self.replicas = [self._node(f"n{i + 1}", self.master.port) for i in range(replicas)]
        self.sentinels = [SentinelProcess(self.master.port, self.dir / f"s{i}")
                          for i in range(sentinels)]

    def _node(self, name: str, master_port: int | None = None) -> RedisServer:
        d = self.dir / name
        d.mkdir()
        extra = list(self.extra)
        if master_port is not None:
            extra.append(f"replicaof 127.0.0.1 {master_port}")
        return RedisServer(appendfsync=self.appendfsync, extra=extra, workdir=str(d),
                           priority_boost=False)

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 20.0) -> SentinelGroup:
        for n in self.nodes:
            n.start()
        for s in self.sentinels:
            s.start()
        self.wait_healthy(timeout)
        return self

    def master_port(self) -> int | None:
        """The port the sentinels' majority currently names as master."""
        ports: dict[int, int] = {}
        for s in self.sentinels:
            if s.proc is None or s.proc.poll() is not None:
                continue
            try:
                addr: Any = s.client().sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if addr:
                ports[int(addr[1])] = ports.get(int(addr[1]), 0) + 1
        if not ports:
            return None
        port, votes = max(ports.items(), key=lambda kv: kv[1])
        return port if votes * 2 > len(self.sentinels) else None

    def node_on(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows the master, every replica and its peer sentinels, and
        every replica is in sync."""
        deadline = time.monotonic() + timeout
        want_replicas = len(self.replicas)
        while time.monotonic() < deadline:
            if self._healthy(want_replicas):
                return
            time.sleep(0.2)
        raise TimeoutError(f"sentinel group not healthy after {timeout}s (logs: {self.dir})")

    def _healthy(self, want_replicas: int) -> bool:
        port = self.master_port()
        if port is None:
            return False
        try:
            for s in self.sentinels:
                m: Any = s.client().sentinel_master(SERVICE)
                if int(m["port"]) != port or "s_down" in m["flags"] or "o_down" in m["flags"]:
                    return False
                if int(m["num-slaves"]) < want_replicas:
                    return False
                if int(m["num-other-sentinels"]) < len(self.sentinels) - 1:
                    return False
            info = redis.Redis(port=port, socket_timeout=1.0).info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]
            return len(online) >= want_replicas
        except (redis.RedisError, KeyError, ValueError):
            return False

    def failover(self) -> None:
        """A graceful ``SENTINEL FAILOVER`` (the operator's switchover)."""
        self.sentinels[0].client().execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "FAILOVER", SERVICE)

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old_port:
                try:
                    role = redis.Redis(port=port, socket_timeout=1.0).info("replication")["role"]
                except redis.RedisError:
                    role = ""
                if role == "master":
                    return port
            time.sleep(0.1)
        raise TimeoutError(f"no new master after {timeout}s (logs: {self.dir})")

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for n in self.nodes:
            n.kill()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
