"""Background duties of a worker beside the pull loop: leases, reclaim, cancellations,
heartbeat and the hung-engine watchdog. Each is one long-running coroutine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from producer.errors import EngineDead
from producer.schema import JobStatus
from worker.feeder import Feeder

log = logging.getLogger("slotfill.worker")


async def renew_leases(feeder: Feeder) -> None:
    """Renew every in-flight entry well inside the lease, so a live worker's long generation
    is never stolen."""
    period = feeder.settings.lease_seconds / 3
    while True:
        await asyncio.sleep(period)
        by_stream: dict[str, list[str]] = defaultdict(list)
        for f in list(feeder.in_flight.values()):
            by_stream[f.row.stream].append(f.row.entry)
        if by_stream:
            await feeder.store.renew_leases(by_stream)


async def reclaim(feeder: Feeder) -> None:
    """Take over entries whose worker stopped renewing (idle past the lease)."""
    lease = feeder.settings.lease_seconds
    period = max(0.2, lease / 4)
    while True:
        await asyncio.sleep(period)
        if feeder.pulling and feeder.free > 0:
            rows = await feeder.store.reclaim_jobs(feeder.free, lease)
            if rows:
                feeder.counters.reclaimed += len(rows)
                for r in rows:
                    log.info("job %s reclaimed (delivery %d)", r.job_id, r.deliveries)
                feeder.launch(rows)


async def listen_for_cancels(feeder: Feeder) -> None:
    """Abort running jobs whose cancellation a client requested (Pub/Sub control channel)."""
    pubsub = feeder.store.redis.pubsub()
    await pubsub.subscribe(feeder.store.keys.control)
    try:
        async for msg in pubsub.listen():
            if msg.get("type") != "message":
                continue
            data = msg["data"]
            job_id = data.decode() if isinstance(data, bytes) else str(data)
            if job_id in feeder.in_flight:
                log.info("job %s cancel requested", job_id)
                feeder.abort(job_id, JobStatus.cancelled)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


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
        busy = any(f.row.flag == "" for f in feeder.in_flight.values())
        if busy and idle > limit:
            log.error("engine made no step for %.0fs with jobs in flight: hung", idle)
            feeder.die(EngineDead(f"engine hung: no step for {idle:.0f}s"))
            return
