"""Submits acknowledged only once replicas hold them (``replica_acks``).

``WAIT n timeout`` counts the replicas that hold *this connection's* writes, so the submit
script and ``WAIT`` go down one connection of the master that ran the script: the client
itself (standalone, Sentinel), or on a Redis Cluster a plain client of the master that owns
the queue's slot (every key of one queue shares it). A cluster pipeline cannot carry either
command, and a cluster client may send two commands down two connections.

A ``MOVED`` / ``ASK`` reply means the script did not run (the slot moved, e.g. a failover):
the slot map is re-read and the call sent once more to the new owner.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError

from producer.connection import is_cluster
from producer.protocol import check_replicated


def run_acked(client: redis.Redis, script: Any, key_list: list[str], args: list[Any],
              replicas: int, timeout_ms: int) -> Any:
    """Run ``script`` (registered on ``client``) and, with ``replicas`` > 0, ``WAIT`` for
    that many replicas on the same connection; RedisUnavailable when fewer held it in time."""
    if not replicas:
        return script(keys=key_list, args=args)
    for attempt in range(2):
        target = client
        if is_cluster(client):
            cluster: Any = client
            target = cluster.get_redis_connection(cluster.get_node_from_key(key_list[0]))
        pipe = target.pipeline(transaction=False)
        script(keys=key_list, args=args, client=pipe)
        pipe.execute_command("WAIT", replicas, timeout_ms)  # type: ignore[no-untyped-call]
        try:
            reply, acks = pipe.execute()
        except (MovedError, AskError):
            if attempt or not is_cluster(client):
                raise
            cluster.nodes_manager.initialize()
            continue
        check_replicated(acks, replicas)
        return reply
    raise AssertionError("unreachable")  # pragma: no cover


class AsyncAcks:
    """The asyncio twin of :func:`run_acked`; keeps one plain client per cluster master it
    used (closed by :meth:`aclose`)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._nodes: dict[str, aioredis.Redis] = {}

    async def _target(self, key: str) -> aioredis.Redis:
        if not is_cluster(self.client):
            return self.client
        cluster: Any = self.client
        await cluster.initialize()
        node = cluster.get_node_from_key(key)
        if node.name not in self._nodes:
            pool = aioredis.ConnectionPool(connection_class=node.connection_class,
                                           **node.connection_kwargs)
            self._nodes[node.name] = aioredis.Redis(connection_pool=pool)
        return self._nodes[node.name]

    async def run(self, script: Any, key_list: list[str], args: list[Any], replicas: int,
                  timeout_ms: int) -> Any:
        if not replicas:
            return await script(keys=key_list, args=args)
        for attempt in range(2):
            pipe = (await self._target(key_list[0])).pipeline(transaction=False)
            await script(keys=key_list, args=args, client=pipe)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            try:
                reply, acks = await pipe.execute()
            except (MovedError, AskError):
                if attempt or not is_cluster(self.client):
                    raise
                await self.aclose()
                await self.client.nodes_manager.initialize()  # type: ignore[attr-defined]
                continue
            check_replicated(acks, replicas)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for c in nodes.values():
            await c.aclose()
