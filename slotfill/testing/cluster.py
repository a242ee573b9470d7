"""A loopback Redis Cluster for tests: ``masters`` masters with ``replicas_per_master``
replicas each, every node a ``redis-server`` child in its own temp dir on a free port, joined
by ``redis-cli --cluster create``."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from slotfill.testing.redis_server import (
    PORT_PERIOD,
    RedisServer,
    candidate_port,
    ephemeral_low,
    port_is_free,
)


class LocalCluster:
    def __init__(self, masters: int = 3, replicas_per_master: int = 0,
                 extra: list[str] | None = None, appendfsync: str | None = "everysec",
                 node_timeout_ms: int = 1000) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="slotfill-cluster-"))
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        # Replicas sync at once: by default a master waits 5 s for more replicas to share one
        # diskless transfer, and a cluster with replicas took 6 s to start instead of ~1.
        lines = ["cluster-enabled yes", "cluster-config-file nodes.conf",
                 f"cluster-node-timeout {node_timeout_ms}", "repl-diskless-sync-delay 0",
                 *(extra or [])]
        self.nodes: list[RedisServer] = []
        taken: set[int] = set()
        for i in range(masters * (1 + replicas_per_master)):
            d = self.dir / f"n{i}"
            d.mkdir()
            port = cluster_port(taken)
            taken |= {port, port + BUS_OFFSET}
            self.nodes.append(RedisServer(appendfsync=appendfsync, extra=lines, workdir=str(d),
                                          port=port, priority_boost=False))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:self.masters])
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 30.0) -> LocalCluster:
        for n in self.nodes:
            n.start()
        cli = shutil.which("redis-cli") or "redis-cli"
        subprocess.run([cli, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout)
        self.wait_ok(timeout)
        return self

    def node_client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=1.0, decode_responses=True)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and the replicas are in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(n) for n in self.nodes if n.proc and n.proc.poll() is None):
                return
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ok after {timeout}s (logs: {self.dir})")

    def _ok(self, node: RedisServer) -> bool:
        try:
            c = self.node_client(node)
            if c.cluster("info")["cluster_state"] != "ok":
                return False
            info = c.info("replication")
            if info["role"] == "slave":
                return bool(info.get("master_link_status") == "up")
            return True
        except (redis.RedisError, KeyError):
            return False

    def master_of_key(self, key: str) -> RedisServer:
        c = self.node_client(self.nodes[0])
        slot = int(c.cluster("keyslot", key))
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            try:
                info = self.node_client(n).info("replication")
                if info["role"] != "master":
                    continue
                for lo, hi in _slot_ranges(self.node_client(n), n.port):
                    if lo <= slot <= hi:
                        return n
            except redis.RedisError:
                continue
        raise LookupError(f"no live master serves slot {slot}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        for n in self.nodes:
            if n is master or n.proc is None or n.proc.poll() is not None:
                continue
            info = self.node_client(n).info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                return n
        raise LookupError(f"no replica of {master.port}")

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port whose cluster bus port (+10000) is free too, both below the kernel's
    ephemeral range when it leaves room (``free_port``); under pytest-xdist both are the
    worker's own (``candidate_port``: the bus is one ``PORT_PERIOD`` above). Neither may be
    in ``taken``: the ports (and buses) of the cluster's other nodes, chosen before any of
    them listens (seen: one node's port was another's bus, and that node failed to start)."""
    for _ in range(200):
        port = candidate_port(ephemeral_low() - BUS_OFFSET)
        if {port, port + BUS_OFFSET} & taken:
            continue
        if port_is_free(port) and port_is_free(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


BUS_OFFSET = PORT_PERIOD  # Redis's: a node's bus port is its port + 10000


def _slot_ranges(c: redis.Redis, port: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    raw = c.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
    for line in str(raw).splitlines():
        parts = line.split()
        if "myself" not in parts[2]:
            continue
        for rng in parts[8:]:
            if rng.startswith("["):
                continue
            lo, _, hi = rng.partition("-")
            out.append((int(lo), int(hi or lo)))
    return out
