"""Background duties of a worker beside the pull loop: leases, reclaim, cancellations,
heartbeat and the hung-engine watchdog. Each is one long-running coroutine."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from producer.errors import EngineDead
from worker.feeder import Feeder

log = logging.getLogger("slotfill.worker")


async def renew_leases(feeder: Feeder) -> None:
    """Renew every held entry well inside the lease, so a live worker's long generation is
    never stolen. The same pass finds cancellations the control channel missed (it was down,
    or the cancel overtook the job) and jobs already finished elsewhere."""
    period = feeder.settings.lease_seconds / 3
    while True:
        await asyncio.sleep(period)
        rows = feeder.held_rows()
        if rows:
            codes = await feeder.store.renew_leases(rows)
            feeder.lease_report(rows, codes)


async def reclaim(feeder: Feeder) -> None:
    """Ask the pull loop for a reclaim sweep (entries whose worker stopped renewing, idle past
    the lease) every quarter lease; the loop runs it before its next read, even when full."""
    period = max(0.2, feeder.settings.lease_seconds / 4)
    while True:
        await asyncio.sleep(period)
        feeder.request_reclaim()


CANCEL_LISTEN_S = 1.0
"""Longest wait for one control message (shorter than the socket timeout)."""


async def listen_for_cancels(feeder: Feeder) -> None:
    """Abort running jobs whose cancellation a client requested: the control channel is a
    sharded Pub/Sub channel (SSUBSCRIBE), served by the master of the queue's slot, so a
    cluster delivers it without broadcasting to every node. Cancels missed while it is down
    are found by lease renewal."""
    pubsub: Any = feeder.store.redis.pubsub()
    await pubsub.ssubscribe(feeder.store.keys.control)
    # A cluster's pub/sub object keeps one connection per node; its reader is separate.
    read = getattr(pubsub, "get_sharded_message", None) or pubsub.get_message
    try:
        while True:
            msg = await read(ignore_subscribe_messages=True, timeout=CANCEL_LISTEN_S)
            if not msg or msg.get("type") != "smessage":
                continue
            data = msg["data"]
            feeder.cancel_requested(data.decode() if isinstance(data, bytes) else str(data))
    finally:
        await pubsub.aclose()


async def heartbeat(feeder: Feeder) -> None:
    """Advertise this worker for ``slotfill status`` (expires when the worker dies)."""
    s = feeder.settings
    started = time.time()
    last_tokens, last_t = 0, time.monotonic()
    while True:
        now = time.monotonic()
        c = feeder.counters
        rate = (c.output_tokens - last_tokens) / max(now - last_t, 1e-6)
        last_tokens, last_t = c.output_tokens, now
        st = feeder.engine.stats
        await feeder.store.heartbeat({
            "consumer": s.consumer, "model": s.model, "started_at": started,
            "capacity": feeder.capacity, "slots": feeder.engine.slots,
            "in_flight": len(feeder.in_flight), "running": st.running, "waiting": st.waiting,
            "kv_cache_usage": st.kv_cache_usage, "steps": st.steps,
            "full_steps": st.full_steps, "starved_steps": st.starved_steps,
            "output_tokens_per_s": round(rate, 1), "output_tokens": c.output_tokens,
            "pulling": int(feeder.pulling), "seen_at": time.time(),
        }, ttl_s=s.heartbeat_seconds * 3)
        await asyncio.sleep(s.heartbeat_seconds)


async def watchdog(feeder: Feeder) -> None:
    """A hung engine makes no steps while jobs wait in it: treat it as dead."""
    limit = feeder.settings.engine_hang_seconds
    while True:
        await asyncio.sleep(min(5.0, limit / 4))
        idle = time.monotonic() - feeder.engine.stats.last_step_at
        # Only jobs inside the engine count: results waiting for Redis are not the engine's.
        busy = any(not f.publishing and f.row.flag == "" for f in feeder.in_flight.values())
        if busy and idle > limit:
            log.error("engine made no step for %.0fs with jobs in flight: hung", idle)
            feeder.die(EngineDead(f"engine hung: no step for {idle:.0f}s"))
            return
