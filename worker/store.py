"""The worker's side of the protocol: every Redis call a worker makes, one method each.

A Redis that is down, stalled, restarting, loading its AOF, read-only or masterless (a
failover in progress), short of replicas (NOREPLICAS), busy or out of memory raises
:class:`RedisUnavailable` (a ``redis.ConnectionError``), which the worker's loops treat as
"wait and retry", never as a reason to die. The classification is by exception class and
Redis error code (``producer.redis_errors``), not message text. Streams or groups that
vanished (a Redis that lost its data) are created again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.errors import RedisUnavailable
from producer.keys import GROUP, QueueKeys
from producer.redis_errors import error_code, is_transient, unavailable
from producer.scripts import batch_args, batched, source

P = ParamSpec("P")
T = TypeVar("T")

SOLO_LOSS_LIMIT = 2
"""A job lost this many times while it ran alone (its engine died or hung, or its worker
vanished, with nothing else inside to blame) is dead-lettered (``poisoned``)."""
HARD_DELIVERY_FACTOR = 3
"""Past ``max_deliveries`` × this many deliveries a job is dead-lettered whatever happened
(a backstop: from ``max_deliveries`` on, it only runs alone, where losses are evidence)."""

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a Redis outage looks like from redis-py: wait and retry, never die of it."""


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
    """"" | "cancel" (cancel requested) | "expired" (past deadline) | "malformed" (no id) |
    "poisoned" (delivered too often, or crashed its engine too often: dead-letter it)."""
    queued_at: float
    solo: bool = False
    """Run it alone in the engine (culprit isolation; see ``reclaim_jobs.lua``)."""

    @property
    def key(self) -> str:
        """The feeder's in-flight key: the job id, or the entry for rows without one."""
        return self.job_id or f"entry:{self.stream}:{self.entry}"


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _common(name: str) -> str:
    return source("_common") + "\n" + source(name)


def _cluster_client_race(e: Exception) -> bool:
    """redis-py 8.1's asyncio cluster client, on a lost node, closes every node's connections
    while other tasks are still writing on them: those fail with AttributeError inside
    redis-py (seen under a cluster master kill -9). It is the same lost connection."""
    if not isinstance(e, AttributeError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/redis/" in tb.tb_frame.f_code.co_filename


def _redis_call(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Map Redis' transient failures to :class:`RedisUnavailable`; recreate lost groups."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except RedisUnavailable:
            raise
        except ResponseError as e:
            if error_code(e) == "NOGROUP" or "no such key" in str(e):
                store = args[0]
                assert isinstance(store, WorkerStore)
                await store.ensure_groups()
                raise RedisUnavailable(f"stream or group was missing, recreated: {e}") from e
            if is_transient(e):
                raise unavailable(e) from e
            raise
        except Exception as e:
            if is_transient(e) or _cluster_client_race(e):
                raise unavailable(e) from e
            raise

    return wrapper


class WorkerStore:
    def __init__(self, redis_client: aioredis.Redis, queue: str, consumer: str) -> None:
        self.redis = redis_client
        self.keys = QueueKeys.for_queue(queue)
        self.consumer = consumer
        self._start = redis_client.register_script(source("start_jobs"))
        self._reclaim = redis_client.register_script(source("reclaim_jobs"))
        self._finish = redis_client.register_script(source("finish_job"))
        self._dead = redis_client.register_script(source("dead_letter_entry"))
        self._renew = redis_client.register_script(source("renew_leases"))
        self._release = redis_client.register_script(_common("release_jobs"))
        self._append = redis_client.register_script(batched("append_tokens"))

    @_redis_call
    async def ensure_groups(self) -> None:
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def _rows(self, raw: list[Any]) -> list[Row]:
        return [Row(_s(r[0]), _s(r[1]), _s(r[2]), _s(r[3]), int(r[4]), int(r[5]), _s(r[6]),
                    float(r[7]), bool(int(r[8])))
                for r in raw]

    @_redis_call
    async def start_jobs(self, count: int) -> list[Row]:
        raw = await self._start(
            keys=self.keys.streams,
            args=[GROUP, self.consumer, count, repr(time.time()), self.keys.base],
        )
        return self._rows(raw)

    @_redis_call
    async def reclaim_jobs(self, count: int, lease_seconds: float, max_deliveries: int,
                           solo_allowed: bool, forget_after_s: float = 0.0) -> list[Row]:
        """Take over entries idle past the lease. At most one ``solo`` row, and only when
        ``solo_allowed``; rows past their loss or delivery limit come flagged ``poisoned``.
        ``forget_after_s`` > 0 also deletes consumers silent that long with nothing pending."""
        raw = await self._reclaim(
            keys=self.keys.streams,
            args=[GROUP, self.consumer, count, repr(time.time()), self.keys.base,
                  int(lease_seconds * 1000), max_deliveries, int(solo_allowed),
                  SOLO_LOSS_LIMIT, int(forget_after_s * 1000),
                  max_deliveries * HARD_DELIVERY_FACTOR],
        )
        return self._rows(raw)

    @_redis_call
    async def mark_solo_run(self, row: Row) -> None:
        """Record that ``row`` now runs alone here: if it is lost before it finishes, the
        loss counts against it (see ``reclaim_jobs.lua``)."""
        if row.job_id:
            await self.redis.hset(self.keys.job(row.job_id), "solo_run", self.consumer)

    @_redis_call
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
            if not mine:
                await self.ensure_groups()
                return
            positions[stream] = _s(mine[0]["last-delivered-id"])
        await self.redis.xread(positions, count=1, block=max(1, int(timeout_s * 1000)))

    @_redis_call
    async def finish(
        self, row: Row, status: str, result_json: str, result_ttl: int,
        dead_reason: str = "",
    ) -> bool:
        """Publish the result, flip the status, wake waiters and XACK: one atomic step.

        Returns False when the job already had a result (a duplicate run, suppressed)."""
        published = await self._finish(
            keys=[row.stream, self.keys.job(row.job_id), self.keys.done(row.job_id),
                  self.keys.stats, self.keys.dead_letter, self.keys.tokens(row.job_id)],
            args=[row.entry, GROUP, status, result_json, repr(time.time()), result_ttl,
                  dead_reason, row.body if dead_reason else "", row.deliveries],
        )
        return bool(published)

    @_redis_call
    async def dead_letter_entry(self, row: Row, reason: str) -> None:
        await self._dead(
            keys=[row.stream, self.keys.dead_letter, self.keys.stats],
            args=[row.entry, GROUP, reason, row.body, row.deliveries, repr(time.time())],
        )

    def _entry_keys(self, rows: Sequence[Row]) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = []
        for r in rows:
            keys += [r.stream, self.keys.job(r.job_id or "-")]
            args += [r.entry, "1" if r.job_id else "0"]
        return keys, args

    @_redis_call
    async def renew_leases(self, rows: Sequence[Row]) -> list[str]:
        """Reset the idle time of our in-flight entries (delivery count unchanged). Returns
        one code per row: ``ok``, ``cancel`` (cancellation requested), ``done`` (the job
        already has a result) or ``lost`` (a peer took the entry over)."""
        if not rows:
            return []
        keys, args = self._entry_keys(rows)
        raw = await self._renew(keys=keys, args=[GROUP, self.consumer, *args])
        return [_s(x) for x in raw]

    @_redis_call
    async def release(self, rows: Sequence[Row], lease_seconds: float, why: str,
                      alone: bool = False) -> int:
        """Give entries back for a peer's next reclaim sweep (they stay unacknowledged).
        ``why`` = ``engine_crash`` also marks their jobs ``suspect`` (and, when ``alone``,
        counts a loss against the one job that was inside)."""
        if not rows:
            return 0
        keys, args = self._entry_keys(rows)
        n = await self._release(keys=keys, args=[
            GROUP, self.consumer, repr(time.time()), int(lease_seconds * 1000), why,
            "1" if alone else "0", *args])
        return int(n)

    @_redis_call
    async def append_tokens(self, appends: Sequence[tuple[Row, str, str, int]],
                            max_entries: int, ttl_s: int) -> list[bool]:
        """Append each ``(row, text, token ids JSON, offset)`` to its job's token stream, in
        one script call (cluster clients refuse pipelined EVALSHA). Per append: False when
        fenced off (the attempt is no longer the job's current one)."""
        if not appends:
            return []
        keys, args = batch_args([
            ([self.keys.job(row.job_id), self.keys.tokens(row.job_id)],
             [row.attempts, max_entries, ttl_s, self.consumer, text, ids, offset])
            for row, text, ids, offset in appends])
        return [bool(x) for x in await self._append(keys=keys, args=args)]

    @_redis_call
    async def heartbeat(self, fields: dict[Any, Any], ttl_s: float) -> None:
        key = self.keys.worker(self.consumer)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, max(1, int(ttl_s)))
        await pipe.execute()

    @_redis_call
    async def drop_heartbeat(self) -> None:
        await self.redis.delete(self.keys.worker(self.consumer))
