"""Background duties of a worker beside the pull loop: leases, reclaim, cancellations,
heartbeat and the hung-engine watchdog. Each is one long-running coroutine, given exactly the
collaborators it reads or tells (the runner wires them); none reaches into the pull loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from producer.connection import is_cluster
from producer.errors import EngineDead
from worker.cancelling import CLEANUP_S, cancel_and_wait
from worker.claim import ClaimedJob
from worker.engines.base import StepStats
from worker.in_flight import Holdings
from worker.settings import WorkerSettings
from worker.state import Counters, FeederState
from worker.store import WorkerStore

log = logging.getLogger("slotfill.worker")


async def renew_leases(store: WorkerStore, holdings: Holdings,
                       report: Callable[[list[ClaimedJob], list[str]], None],
                       lease_s: float) -> None:
    """Renew every held entry well inside the lease, so a live worker's long generation is
    never stolen. The same pass finds cancellations the control channel missed (it was down,
    or the cancel overtook the job) and jobs already finished elsewhere: ``report`` acts."""
    while True:
        await asyncio.sleep(lease_s / 3)
        rows = holdings.rows()
        if rows:
            report(rows, await store.renew_leases(rows))


async def reclaim(request: Callable[[], None], lease_s: float) -> None:
    """Ask the pull loop for a reclaim sweep (entries whose worker stopped renewing, idle past
    the lease) every quarter lease; the loop runs it before its next read, even when full."""
    while True:
        await asyncio.sleep(max(0.2, lease_s / 4))
        request()


CANCEL_LISTEN_S = 1.0
"""Longest wait for one control message (shorter than the socket timeout)."""


CHANNELS_CHECK_S = 2.0
"""How often the cancel listeners look for a changed shard layout (a reshard)."""


async def listen_for_cancels_on(redis: aioredis.Redis, channels: Callable[[], list[str]],
                                on_cancel: Callable[[str], None]) -> None:
    """One listener per shard's control channel (a sharded queue's shards live on different
    masters), started again when the shards change; lease renewal finds the cancels sent
    meanwhile."""
    while True:
        names = channels()
        tasks = [asyncio.ensure_future(listen_for_cancels(redis, c, on_cancel)) for c in names]
        try:
            while channels() == names:
                done, _ = await asyncio.wait(tasks, timeout=CHANNELS_CHECK_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if done:
                    for t in done:
                        t.result()  # a listener's failure reaches the worker's retry loop
                    break
        finally:
            await cancel_and_wait(tasks, CLEANUP_S)


async def listen_for_cancels(redis: aioredis.Redis, channel: str,
                             on_cancel: Callable[[str], None]) -> None:
    """Abort running jobs whose cancellation a client requested: the control channel is a
    sharded Pub/Sub channel (SSUBSCRIBE), served by the master of the queue's slot, so a
    cluster delivers it without broadcasting to every node. Cancels missed while it is down
    are found by lease renewal."""
    client = await _channel_client(redis, channel)
    pubsub: Any = client.pubsub()
    try:
        await pubsub.ssubscribe(channel)
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                           timeout=CANCEL_LISTEN_S)
            if not msg or msg.get("type") != "smessage":
                continue
            data = msg["data"]
            on_cancel(data.decode() if isinstance(data, bytes) else str(data))
    finally:
        await pubsub.aclose()
        if client is not redis:
            await client.aclose()


async def _channel_client(redis: aioredis.Redis, channel: str) -> aioredis.Redis:
    """The client to subscribe with: ``redis`` itself, or for a cluster a plain client of the
    master that serves the channel's slot. (redis-py 8.1's cluster pub/sub, which moves
    subscriptions itself when slots move, froze a whole worker during a cluster failover;
    here a failover ends the subscription and the listener starts again on the new master.)"""
    if not is_cluster(redis):
        return redis
    cluster: Any = redis
    await cluster.initialize()
    node = cluster.get_node_from_key(channel)
    pool = aioredis.ConnectionPool(connection_class=node.connection_class,
                                   **node.connection_kwargs)
    return aioredis.Redis(connection_pool=pool)


@dataclass(frozen=True)
class WorkerView:
    """What the heartbeat reports: read-only views of the engine and the pull loop."""

    stats: StepStats
    state: FeederState
    counters: Counters
    holdings: Holdings
    capacity: int
    slots: int
    max_model_len: int


async def heartbeat(store: WorkerStore, settings: WorkerSettings, view: WorkerView) -> None:
    """Advertise this worker for ``slotfill status`` (expires when the worker dies)."""
    s = settings
    started = time.time()
    last_tokens, last_t = 0, time.monotonic()
    while True:
        now = time.monotonic()
        c, st = view.counters, view.stats
        rate = (c.output_tokens - last_tokens) / max(now - last_t, 1e-6)
        last_tokens, last_t = c.output_tokens, now
        resharded = await store.heartbeat({
            "consumer": s.consumer, "model": s.model, "started_at": started,
            "capacity": view.capacity, "slots": view.slots,
            "max_model_len": view.max_model_len,
            "max_num_batched_tokens": s.max_num_batched_tokens,
            "in_flight": len(view.holdings), "running": st.running, "waiting": st.waiting,
            "kv_cache_usage": st.kv_cache_usage, "steps": st.steps,
            "full_steps": st.full_steps, "starved_steps": view.state.starved_steps,
            "output_tokens_per_s": round(rate, 1), "output_tokens": c.output_tokens,
            "pulling": int(view.state.pulling), "seen_at": time.time(),
            "home_shard": store.shards.home.queue,
        }, ttl_s=s.heartbeat_seconds * 3)
        if resharded:  # an operator changed the queue's shard layout
            log.info("queue %s now has %d shards", store.keys.queue, store.shards.layout.n)
            await store.ensure_groups()
            await store.seed_config(s.max_pending)
        await asyncio.sleep(s.heartbeat_seconds)


async def watchdog(stats: StepStats, state: FeederState, holdings: Holdings,
                   on_hang: Callable[[BaseException], None], limit_s: float) -> None:
    """A hung engine makes no steps while jobs wait in it: treat it as dead."""
    while True:
        await asyncio.sleep(min(5.0, limit_s / 4))
        idle = time.monotonic() - max(stats.last_step_at, state.busy_since)
        # Only jobs inside the engine count: results waiting for Redis are not the engine's.
        if holdings.inside_engine() and idle > limit_s:
            log.error("engine made no step for %.0fs with jobs in flight: hung", idle)
            on_hang(EngineDead(f"engine hung: no step for {idle:.0f}s"))
            return
