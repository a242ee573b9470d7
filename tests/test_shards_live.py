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
from producer.shards import read_layout, shard_index
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer
from worker.claim import ClaimedJob
from worker.store import WorkerStore


def test_a_running_worker_picks_up_a_new_layout(client: Client, r: redis.Redis,
                                                inproc: Callable[..., Any]) -> None:
    w = inproc("w", heartbeat_seconds=0.2, sim_step_ms=20).wait_ready()
    assert client.wait(client.submit("before", max_tokens=2).id, timeout=10).ok
    client.configure_queue(shards=3)
    layout = read_layout(r, client.settings.queue)
    wait_until(lambda: all(r.exists(s) for k in layout.all_keys for s in k.streams),
               timeout=10, what="the worker making the new shards' groups")
    ids = client.submit_many([{"prompt": f"p{i}", "max_tokens": 3} for i in range(60)])
    assert {client.wait(j, timeout=20).status for j in ids} == {JobStatus.succeeded}
    assert {layout.for_job(j).queue for j in ids} == set(layout.names)
    # A running job on a new shard is cancelled through that shard's control channel, which
    # the worker subscribed to when the layout changed.
    wait_until(lambda: all(_subscribers(r, k.control) == 1 for k in layout.all_keys),
               timeout=10, what="the worker listening on every shard's control channel")
    key = next(f"k{i}" for i in range(100) if shard_index(f"k{i}", 3) == 2)
    long = client.submit("long", max_tokens=400, idempotency_key=key)
    assert layout.for_job(long.id) == layout.keys(2)
    wait_until(lambda: client.status(long.id) is JobStatus.running, timeout=10,
               what="the long job running")
    assert client.cancel(long.id) == "requested"
    assert client.wait(long.id, timeout=10).status is JobStatus.cancelled
    assert f"job {long.id} cancel requested (control channel)" in w.log_text()
    assert w.alive


def _subscribers(r: redis.Redis, channel: str) -> int:
    reply = r.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
    return int(reply[1])


def test_a_vanished_workers_jobs_are_reclaimed_on_every_shard(
        client: Client, r: redis.Redis, redis_server: RedisServer,
        inproc: Callable[..., Any]) -> None:
    client.configure_queue(shards=3)
    layout = read_layout(r, client.settings.queue)
    keys = [k for shard in range(3) for k in
            [f"v{i}" for i in range(200) if shard_index(f"v{i}", 3) == shard][:4]]
    ids = [client.submit("x", max_tokens=3, idempotency_key=k).id for k in keys]  # 4 a shard

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
