"""The worker's side of the protocol: every Redis call a worker makes, one method each.

A Redis that is down, stalled, restarting, loading its AOF, read-only or masterless (a
failover in progress), short of replicas (NOREPLICAS), busy or out of memory raises
:class:`RedisUnavailable` (a ``redis.ConnectionError``), which the worker's loops treat as
"wait and retry", never as a reason to die. The classification is by exception class and
Redis error code (``producer.redis_errors``), not message text. Streams or groups that
vanished (a Redis that lost its data) are created again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.connection import is_cluster
from producer.errors import RedisUnavailable
from producer.keys import GROUP, QueueKeys
from producer.redis_errors import error_code, is_transient, unavailable
from producer.scripts import batch_args, batched, source
from producer.shards import LAYOUT_FIELDS, parse_layout
from worker.appends import Append as Append
from worker.cancelling import cancel_and_wait
from worker.claim import ClaimedJob, Disposition, LostClaims, decode
from worker.coalesce import Coalesced
from worker.shard_set import ShardSet

log = logging.getLogger("slotfill.worker")
P = ParamSpec("P")
T = TypeVar("T")

SOLO_LOSS_LIMIT = 2
"""A job whose engine died or hung this many times while it was alone inside (each reported
by that engine's worker) is dead-lettered (``poisoned``). The rule: lua/includes/poison.lua."""
HARD_DELIVERY_FACTOR = 3
"""Past ``max_deliveries`` × this many deliveries a job is dead-lettered whatever happened
(the backstop for losses nobody reported: a job that kills its worker outright)."""

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a Redis outage looks like from redis-py: wait and retry, never die of it."""
SHARD_ERRORS: tuple[type[Exception], ...] = (ResponseError, *REDIS_ERRORS)
"""A read of a later shard that fails after an earlier one claimed jobs: keep those."""


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


CLOCK_DRIFT_S_PER_S = 0.001
"""How fast the error of a clock sample in use is assumed to grow (seconds per second): far
above real clock drift, so a better-or-equal sample a moment later always replaces it."""


def _raw(body: str) -> bytes:
    return body.encode("utf-8", "surrogateescape")


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
        """The queue's own keys (shard 0): config, heartbeats."""
        self.consumer = consumer
        self.shards = ShardSet(queue, consumer)
        """Every shard's keys, home first (one: the queue itself, until ``load_layout``)."""
        self.lost_claims = LostClaims()
        """Claims of ours that may have run with their reply lost (the pull loop sweeps)."""
        self._cluster = is_cluster(redis_client)
        self.clock_offset = 0.0
        """Redis' clock minus this host's, seconds (``sync_clock``)."""
        self._clock_err, self._clock_at = math.inf, 0.0
        self._start = redis_client.register_script(source("start_jobs"))
        self._reclaim = redis_client.register_script(source("reclaim_jobs"))
        self._finish = redis_client.register_script(source("finish_job"))
        self._finishes = Coalesced(redis_client.register_script(batched("finish_job")),
                                    self._finish)
        self._dead = redis_client.register_script(source("dead_letter_entry"))
        self._renew = redis_client.register_script(source("renew_leases"))
        self._release = redis_client.register_script(source("release_jobs"))
        self._append = redis_client.register_script(batched("append_tokens"))

    @_redis_call
    async def load_layout(self) -> bool:
        """Read the queue's shard layout (producer/shards.py); True when it changed (the
        caller then makes the new shards' groups). The heartbeat reads it too."""
        return self._use_layout(await self.redis.hmget(self.keys.config, *LAYOUT_FIELDS))

    def _use_layout(self, raw: Sequence[Any]) -> bool:
        try:
            return self.shards.set_layout(parse_layout(self.keys.queue, *raw))
        except ValueError as e:  # an operator's typo must not stop the fleet: keep pulling
            log.error("%s; still pulling the shards of the layout in use", e)
            return False

    @_redis_call
    async def ensure_groups(self) -> None:
        for keys in self.shards.order:
            for stream in keys.streams:
                try:
                    await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise

    async def seed_config(self, max_pending: int) -> None:
        """Give each shard a cap when it has none (an operator's ``configure_queue`` wins:
        the submit step reads it there, never from its caller)."""
        for keys in self.shards.order:
            await self.redis.hsetnx(keys.config, "max_pending", max_pending)

    @_redis_call
    async def start_jobs(self, count: int) -> list[ClaimedJob]:
        """New entries, from the home shard first; the others only when it has too few."""
        rows: list[ClaimedJob] = []
        for keys in self.shards.order:
            try:
                rows += decode(await self._start(
                    keys=keys.streams,
                    args=[GROUP, self.consumer, count - len(rows), repr(self.now()), keys.base]))
            except SHARD_ERRORS as e:
                self.lost_claims.failed(e)
                if not rows:
                    raise
                break  # keep what is claimed (else it waits out a lease); the next read retries
            if len(rows) >= count:
                break
        return rows

    @_redis_call
    async def reclaim_jobs(self, count: int, lease_seconds: float, max_deliveries: int,
                           solo_allowed: bool, forget_after_s: float = 0.0,
                           own: bool = False) -> list[ClaimedJob]:
        """Take over entries idle past the lease, on every shard. At most one claim to run
        alone, and only when ``solo_allowed``; jobs past the poison rule's limits come
        ``poisoned``. ``forget_after_s`` > 0 also deletes consumers silent that long with
        nothing pending. ``own``: only this worker's entries (claims whose reply was lost),
        as the same delivery."""
        rows: list[ClaimedJob] = []
        for keys in self.shards.order:
            solo = solo_allowed and not any(
                r.disposition is Disposition.run_alone for r in rows)
            try:
                rows += decode(await self._reclaim(
                    keys=keys.streams,
                    args=[GROUP, self.consumer, max(0, count - len(rows)), repr(self.now()),
                          keys.base, int(lease_seconds * 1000), max_deliveries, int(solo),
                          SOLO_LOSS_LIMIT, int(forget_after_s * 1000),
                          max_deliveries * HARD_DELIVERY_FACTOR, "own" if own else ""]))
            except SHARD_ERRORS as e:
                self.lost_claims.failed(e)
                if not rows:
                    raise
                break  # keep what is claimed; the next sweep covers the rest
        return rows

    @_redis_call
    async def mark_solo_run(self, row: ClaimedJob) -> None:
        """Record that ``row`` now runs alone here. Never evidence against the job (a worker
        that vanishes reports nothing): a reclaim notes it in the job's history."""
        if row.job_id:
            await self.redis.hset(self.shards.keys_of(row.stream).job(row.job_id),
                                  "solo_run", self.consumer)

    @_redis_call
    async def wait_for_work(self, timeout_s: float) -> None:
        """Block until an entry not yet delivered to the group may exist, or the timeout.

        Reads from each stream's group position (last-delivered-id) so an entry added after
        the last ``start_jobs`` is never missed (no lost wake-up); a spurious wake only costs
        one empty ``start_jobs``.
        """
        if not self.shards.sharded:
            await self._wait_on(self.keys, timeout_s)
            return
        # One blocking read per shard (a cluster refuses one XREAD across slots): the first
        # to return wakes the pull loop, the others are cancelled.
        waits = [asyncio.ensure_future(self._wait_on(k, timeout_s)) for k in self.shards.order]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(waits)
        for t in done:
            t.result()  # an outage on a shard reaches the loop's backoff

    async def _wait_on(self, keys: QueueKeys, timeout_s: float) -> None:
        positions: dict[Any, Any] = {}
        for stream in keys.streams:
            groups = await self.redis.xinfo_groups(stream)
            mine = [g for g in groups if _s(g["name"]) == GROUP]
            if not mine:
                await self.ensure_groups()
                return
            positions[stream] = _s(mine[0]["last-delivered-id"])
        await self.redis.xread(positions, count=1, block=max(1, int(timeout_s * 1000)))

    @_redis_call
    async def finish(
        self, row: ClaimedJob, status: str, result_json: str, result_ttl: int,
        dead_reason: str = "", callback: str = "", redeliver_s: float = 30.0,
    ) -> bool:
        """Publish the result, flip the status, wake waiters and XACK: one atomic step.

        Idempotent for this attempt: a retry after a lost reply returns True again when the
        first call did write. False when the result is not this attempt's: the job already had
        another's (a duplicate run, suppressed), or a later attempt owns it (our lease was
        taken; the current attempt publishes). ``callback`` (its JSON spec) goes to the
        callback outbox in the same step, offered to any worker after ``redeliver_s``."""
        now = self.now()
        k = self.shards.keys_of(row.stream)
        published = await self._finishes.call(
            [row.stream, k.job(row.job_id), k.done(row.job_id), k.stats, k.dead_letter,
             k.tokens(row.job_id), k.callbacks],
            [row.entry, GROUP, status, result_json, repr(now), result_ttl,
             dead_reason, _raw(row.body) if dead_reason else "", row.deliveries,
             row.attempts, callback, repr(now + redeliver_s)])
        return bool(published)

    @_redis_call
    async def dead_letter_entry(self, row: ClaimedJob, reason: str) -> None:
        k = self.shards.keys_of(row.stream)
        await self._dead(
            keys=[row.stream, k.dead_letter, k.stats],
            args=[row.entry, GROUP, reason, _raw(row.body), row.deliveries, repr(self.now())],
        )

    @staticmethod
    def _entry_keys(shard: QueueKeys, rows: Sequence[ClaimedJob]
                    ) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        args: list[str] = []
        for r in rows:
            keys += [r.stream, shard.job(r.job_id or "-")]
            args += [r.entry, "1" if r.job_id else "0"]
        return keys, args

    @_redis_call
    async def renew_leases(self, rows: Sequence[ClaimedJob]) -> list[str]:
        """Reset the idle time of our in-flight entries (delivery count unchanged). Returns
        one code per row: ``ok``, ``cancel`` (cancellation requested), ``done`` (the job
        already has a result) or ``lost`` (a peer took the entry over)."""
        codes = [""] * len(rows)
        for shard, where in self.shards.group(rows, lambda r: r.stream):
            keys, args = self._entry_keys(shard, [rows[p] for p in where])
            raw = await self._renew(keys=keys, args=[GROUP, self.consumer, *args])
            for p, x in zip(where, raw, strict=True):
                codes[p] = _s(x)
        return codes

    @_redis_call
    async def release(self, rows: Sequence[ClaimedJob], lease_seconds: float, why: str,
                      alone: bool = False) -> int:
        """Give entries back for a peer's next reclaim sweep (they stay unacknowledged).
        ``why`` = ``engine_crash`` also marks their jobs ``suspect`` (and, when ``alone``,
        counts a loss against the one job that was inside)."""
        n = 0
        for shard, where in self.shards.group(rows, lambda r: r.stream):
            keys, args = self._entry_keys(shard, [rows[p] for p in where])
            n += int(await self._release(keys=keys, args=[
                GROUP, self.consumer, repr(self.now()), int(lease_seconds * 1000), why,
                "1" if alone else "0", *args]))
        return n

    @_redis_call
    async def append_tokens(self, appends: Sequence[Append], max_entries: int,
                            ttl_s: int, checkpoint_ttl_s: int) -> list[int]:
        """Write each append to its job's token stream and checkpoint, in one script call
        (cluster clients refuse pipelined EVALSHA). Per append: 1 written (or already there: a
        retry), 0 fenced off (the attempt is no longer the job's current one), -1 refused (it
        does not follow what the stream or checkpoint holds)."""
        out = [0] * len(appends)
        for k, where in self.shards.group(appends, lambda a: a.row.stream):
            keys, args = batch_args([
                ([k.job(a.row.job_id), k.tokens(a.row.job_id), k.checkpoint(a.row.job_id)],
                 [a.row.attempts, max_entries, ttl_s, self.consumer, a.text, a.ids, a.offset,
                  a.tokens, a.seq, "1" if a.stream else "0", a.checkpoint,
                  "" if a.resumed_at is None else a.resumed_at, checkpoint_ttl_s])
                for a in (appends[p] for p in where)])
            replies = await self._append(keys=keys, args=args)
            for p, x in zip(where, replies, strict=True):
                if isinstance(x, ResponseError):  # a call the batch could not run (READONLY)
                    raise x
                out[p] = int(x)
        return out

    @_redis_call
    async def load_checkpoint(self, row: ClaimedJob) -> list[int]:
        """The generated token ids a job's earlier attempts checkpointed (read after this
        worker's claim fenced them off, so it cannot grow meanwhile)."""
        k, job_id = self.shards.keys_of(row.stream), row.job_id
        pipe = self.redis.pipeline(transaction=False)  # no MULTI: see heartbeat
        pipe.get(k.checkpoint(job_id))
        pipe.hget(k.job(job_id), "ckpt_tokens")
        raw, count = await pipe.execute()
        ids = [int(x) for x in _s(raw or b"").split(",") if x]
        if len(ids) != int(count or 0):
            return []  # expired or torn: start over rather than trust it
        return ids

    @_redis_call
    async def heartbeat(self, fields: dict[Any, Any], ttl_s: float) -> bool:
        """Advertise this worker; the same round trip reads Redis' clock (``sync_clock``)
        and the queue's shard layout (same slot as the heartbeat). True when the layout
        changed (the caller makes the new shards' groups)."""
        key = self.keys.worker(self.consumer)
        # Never a MULTI pipeline: redis-py's asyncio cluster client runs each command queued
        # on one in a new thread with its own event loop and joins it, blocking this loop;
        # after a master was killed that thread re-initialised the cluster with this loop's
        # connections and hung for good (the frozen worker of the cluster kill test: SIGTERM
        # unanswered; found with its SIGUSR1 stack dump). Nothing here needs atomicity.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, max(1, int(ttl_s)))
        pipe.hmget(self.keys.config, *LAYOUT_FIELDS)
        if self._cluster:  # a cluster pipeline refuses keyless commands: TIME on its own
            reply = await pipe.execute()
            await self.sync_clock()
            return self._use_layout(reply[2])
        pipe.time()
        t0 = time.time()
        reply = await pipe.execute()
        self._set_clock(reply[-1], t0, time.time())
        return self._use_layout(reply[2])

    async def sync_clock(self) -> None:
        """Measure this host's clock against Redis' (``TIME``)."""
        t0 = time.time()
        reply = await self.redis.time()
        self._set_clock(reply, t0, time.time())

    def _set_clock(self, reply: Any, t0: float, t1: float) -> None:
        """Take a ``TIME`` sample if it is at least as exact as the one in use. A sample is
        off by at most half its round trip, and on a busy worker the round trip includes
        event-loop stalls (seen: a deadline of 0.8 s expired before start after one slow
        sample); the error of the sample in use grows by ``CLOCK_DRIFT_S_PER_S`` with its
        age, so a jumped host clock is re-learned within seconds."""
        sec, usec = reply
        err = (t1 - t0) / 2
        held = self._clock_err + (t1 - self._clock_at) * CLOCK_DRIFT_S_PER_S
        if err <= held:
            self.clock_offset = int(sec) + int(usec) / 1e6 - (t0 + t1) / 2
            self._clock_err, self._clock_at = err, t1

    def now(self) -> float:
        """Unix seconds on Redis' clock (the one deadlines and record times use), from this
        host's clock and the offset last measured: a worker whose clock is off changes no
        deadline."""
        return time.time() + self.clock_offset

    @_redis_call
    async def drop_heartbeat(self) -> None:
        await self.redis.delete(self.keys.worker(self.consumer))
