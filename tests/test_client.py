"""The client, no worker: submission, backpressure, cancel, wait. The script-level checks run
on fakeredis (``fake_client``/``fake_r``); blocking waits and the async client on the real
redis-server."""

from __future__ import annotations

import time

import pytest
import redis

from producer import (
    AsyncClient,
    Client,
    ClientSettings,
    InvalidRequest,
    JobNotFound,
    JobStatus,
    QueueFull,
    QueueKeys,
    WaitTimeout,
)
from slotfill.testing.redis_server import RedisServer


def test_submit_writes_a_queued_job(fake_client: Client, fake_r: redis.Redis, queue: str) -> None:
    job = fake_client.submit(prompt="hello", max_tokens=4)
    assert job.created and job.queue == queue
    assert fake_client.status(job.id) is JobStatus.queued
    assert fake_client.result(job.id) is None
    keys = QueueKeys.for_queue(queue)
    assert fake_r.xlen(keys.stream("normal")) == 1
    entry = fake_r.xrange(keys.stream("normal"))[0][1]
    assert entry[b"id"].decode() == job.id and b"hello" in entry[b"body"]


def test_chat_and_token_prompts_are_accepted(fake_client: Client) -> None:
    fake_client.submit(messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    fake_client.submit(prompt=[1, 2, 3], max_tokens=3)


def test_invalid_request_is_refused_before_redis(
        fake_client: Client, fake_r: redis.Redis, queue: str) -> None:
    with pytest.raises(InvalidRequest):
        fake_client.submit(prompt="x", temperature=float("nan"))
    assert fake_r.xlen(QueueKeys.for_queue(queue).stream("normal")) == 0


def test_idempotency_key_returns_the_same_job(fake_client: Client) -> None:
    a = fake_client.submit(prompt="x", idempotency_key="order-42")
    b = fake_client.submit(prompt="x", idempotency_key="order-42")
    assert a.id == b.id and a.created and not b.created


def test_queue_full_refuses_and_trims_nothing(fake_r: redis.Redis, queue: str) -> None:
    c = Client(fake_r, ClientSettings(queue=queue))
    c.configure_queue(max_pending=5)  # the cap lives in Redis, not in the caller
    ids = [c.submit(prompt=f"p{i}").id for i in range(5)]
    with pytest.raises(QueueFull) as e:
        c.submit(prompt="one too many")
    assert e.value.retryable
    assert all(c.status(i) is JobStatus.queued for i in ids)
    with pytest.raises(QueueFull) as e2:
        c.submit_many([{"prompt": "a"}, {"prompt": "b"}])
    assert e2.value.accepted == [None, None]


def test_a_batch_counts_its_own_jobs_against_the_cap(client: Client, r: redis.Redis,
                                                     queue: str) -> None:
    # One script call reads the queue's cap and count once and counts what it adds itself.
    client.configure_queue(max_pending=4)
    client.submit(prompt="already there")
    with pytest.raises(QueueFull) as e:
        client.submit_many([{"prompt": f"p{i}", "priority": p}
                            for i, p in enumerate(["low", "high", "normal", "low", "high"])])
    accepted = e.value.accepted
    assert [a is not None for a in accepted] == [True, True, True, False, False]
    keys = QueueKeys.for_queue(queue)
    assert sum(r.xlen(s) for s in keys.streams) == 4


def test_submit_many_is_pipelined_and_ordered(client: Client, r: redis.Redis, queue: str) -> None:
    # On the real server: 2500 scripted submits take ~10x as long on fakeredis's Lua.
    ids = client.submit_many([{"prompt": f"p{i}", "max_tokens": 2} for i in range(2500)],
                             chunk=1000)
    assert len(ids) == len(set(ids)) == 2500
    entries = r.xrange(QueueKeys.for_queue(queue).stream("normal"))
    assert [e[1][b"id"].decode() for e in entries] == ids


def test_submit_many_validates_everything_first(
        fake_client: Client, fake_r: redis.Redis, queue: str) -> None:
    with pytest.raises(InvalidRequest):
        fake_client.submit_many([{"prompt": "ok"}, {"prompt": "bad", "max_tokens": -3}])
    assert fake_r.xlen(QueueKeys.for_queue(queue).stream("normal")) == 0


def test_cancel_a_queued_job(fake_client: Client, fake_r: redis.Redis, queue: str) -> None:
    job = fake_client.submit(prompt="never runs")
    assert fake_client.cancel(job.id) == "cancelled"
    assert fake_client.status(job.id) is JobStatus.cancelled
    res = fake_client.wait(job.id, timeout=1)
    assert res.status is JobStatus.cancelled
    assert fake_r.xlen(QueueKeys.for_queue(queue).stream("normal")) == 0
    assert fake_client.cancel(job.id) == "finished"
    assert fake_client.cancel("0" * 32) == "unknown"


def test_wait_times_out_without_polling(client: Client) -> None:
    job = client.submit(prompt="nobody works this queue")
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout):
        client.wait(job.id, timeout=0.5)
    assert time.monotonic() - t0 >= 0.45


def test_unknown_job(fake_client: Client) -> None:
    with pytest.raises(JobNotFound):
        fake_client.status("f" * 32)
    with pytest.raises(JobNotFound):
        fake_client.wait("f" * 32, timeout=0.1)


async def test_async_client_mirrors_the_sync_one(redis_server: RedisServer, queue: str) -> None:
    async with AsyncClient.from_url(redis_server.url, queue=queue) as ac:
        job = await ac.submit(prompt="hi", max_tokens=2)
        assert await ac.status(job.id) is JobStatus.queued
        ids = await ac.submit_many([{"prompt": "a"}, {"prompt": "b"}])
        assert len(ids) == 2
        assert await ac.cancel(job.id) == "cancelled"
        res = await ac.wait(job.id, timeout=1)
        assert res.status is JobStatus.cancelled
        with pytest.raises(WaitTimeout):
            await ac.wait(ids[0], timeout=0.2)
