"""Sharded queues on one plain Redis (every slot on one server: the routing and the worker
logic without a cluster): a running worker picks up a new layout at its next heartbeat, and
the jobs a vanished worker held on every shard are reclaimed by a peer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from producer import Client, JobStatus
from producer.shards import read_layout
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer
from worker.claim import ClaimedJob
from worker.store import WorkerStore


def test_a_running_worker_picks_up_a_new_layout(client: Client, r: redis.Redis,
                                                inproc: Callable[..., Any]) -> None:
    w = inproc("w", heartbeat_seconds=0.2).wait_ready()
    assert client.wait(client.submit("before", max_tokens=2).id, timeout=10).ok
    client.configure_queue(shards=3)
    layout = read_layout(r, client.settings.queue)
    wait_until(lambda: all(r.exists(s) for k in layout.all_keys for s in k.streams),
               timeout=10, what="the worker making the new shards' groups")
    ids = client.submit_many([{"prompt": f"p{i}", "max_tokens": 3} for i in range(60)])
    assert {client.wait(j, timeout=20).status for j in ids} == {JobStatus.succeeded}
    assert {layout.for_job(j).queue for j in ids} == set(layout.names)
    assert w.alive


def test_a_vanished_workers_jobs_are_reclaimed_on_every_shard(
        client: Client, r: redis.Redis, redis_server: RedisServer,
        inproc: Callable[..., Any]) -> None:
    client.configure_queue(shards=3)
    layout = read_layout(r, client.settings.queue)
    ids = client.submit_many([{"prompt": "x", "max_tokens": 3}] * 12)

    async def claim_and_vanish() -> list[ClaimedJob]:
        conn = aioredis.from_url(redis_server.url)
        store = WorkerStore(conn, client.settings.queue, "gone")
        assert await store.load_layout()
        await store.ensure_groups()
        rows = await store.start_jobs(12)  # from its home shard first, then the others
        await conn.aclose()
        return rows

    rows = asyncio.run(claim_and_vanish())
    assert sorted(x.job_id for x in rows) == sorted(ids)
    assert len({x.stream for x in rows}) == 3  # claimed on all three shards
    inproc("b", lease_seconds=1, heartbeat_seconds=0.2).wait_ready()
    assert all(client.wait(j, timeout=30).ok for j in ids)
    for j in ids:
        worker, attempts = r.hmget(layout.for_job(j).job(j), "worker", "attempts")
        assert (worker, attempts) == (b"b", b"2")
