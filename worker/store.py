"""The worker's side of the protocol: every Redis call a worker makes, one method each."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer.keys import GROUP, QueueKeys
from producer.scripts import source


@dataclass
class Row:
    """One delivered stream entry, as ``start_jobs`` / ``reclaim_jobs`` hand it over."""

    stream: str
    entry: str
    job_id: str
    body: str
    attempts: int
    deliveries: int
    flag: str
    """"" | "cancel" (cancel requested) | "expired" (past deadline) | "malformed" (no id)."""
    queued_at: float


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


class WorkerStore:
    def __init__(self, redis_client: aioredis.Redis, queue: str, consumer: str) -> None:
        self.redis = redis_client
        self.keys = QueueKeys.for_queue(queue)
        self.consumer = consumer
        self._start = redis_client.register_script(source("start_jobs"))
        self._reclaim = redis_client.register_script(source("reclaim_jobs"))
        self._finish = redis_client.register_script(source("finish_job"))
        self._dead = redis_client.register_script(source("dead_letter_entry"))

    async def ensure_groups(self) -> None:
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _rows(self, raw: list[Any]) -> list[Row]:
        return [Row(_s(r[0]), _s(r[1]), _s(r[2]), _s(r[3]), int(r[4]), int(r[5]), _s(r[6]),
                    float(r[7]))
                for r in raw]

    async def start_jobs(self, count: int) -> list[Row]:
        raw = await self._start(
            keys=self.keys.streams,
            args=[GROUP, self.consumer, count, repr(time.time()), self.keys.base],
        )
        return self._rows(raw)

    async def reclaim_jobs(self, count: int, lease_seconds: float) -> list[Row]:
        raw = await self._reclaim(
            keys=self.keys.streams,
            args=[GROUP, self.consumer, count, repr(time.time()), self.keys.base,
                  int(lease_seconds * 1000)],
        )
        return self._rows(raw)

    async def wait_for_work(self, timeout_s: float) -> None:
        """Block until an entry not yet delivered to the group may exist, or the timeout.

        Reads from each stream's group position (last-delivered-id) so an entry added after
        the last ``start_jobs`` is never missed (no lost wake-up); a spurious wake only costs
        one empty ``start_jobs``.
        """
        positions: dict[Any, Any] = {}
        for stream in self.keys.streams:
            groups = await self.redis.xinfo_groups(stream)
            mine = [g for g in groups if _s(g["name"]) == GROUP]
            positions[stream] = _s(mine[0]["last-delivered-id"]) if mine else "0-0"
        await self.redis.xread(positions, count=1, block=max(1, int(timeout_s * 1000)))

    async def finish(
        self, row: Row, status: str, result_json: str, result_ttl: int,
        dead_reason: str = "",
    ) -> bool:
        """Publish the result, flip the status, wake waiters and XACK: one atomic step.

        Returns False when the job already had a result (a duplicate run, suppressed)."""
        published = await self._finish(
            keys=[row.stream, self.keys.job(row.job_id), self.keys.done(row.job_id),
                  self.keys.stats, self.keys.dead_letter],
            args=[row.entry, GROUP, status, result_json, repr(time.time()), result_ttl,
                  dead_reason, row.body if dead_reason else "", row.deliveries],
        )
        return bool(published)

    async def dead_letter_entry(self, row: Row, reason: str) -> None:
        await self._dead(
            keys=[row.stream, self.keys.dead_letter, self.keys.stats],
            args=[row.entry, GROUP, reason, row.body, row.deliveries, repr(time.time())],
        )

    async def renew_leases(self, entries_by_stream: dict[str, list[Any]]) -> None:
        """Reset the idle time of our in-flight entries (delivery count unchanged)."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in entries_by_stream.items():
            if ids:
                pipe.xclaim(stream, GROUP, self.consumer, 0, ids, justid=True)
        await pipe.execute()

    async def heartbeat(self, fields: dict[Any, Any], ttl_s: float) -> None:
        key = self.keys.worker(self.consumer)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, max(1, int(ttl_s)))
        await pipe.execute()

    async def drop_heartbeat(self) -> None:
        await self.redis.delete(self.keys.worker(self.consumer))
