"""Batched waiting (``Client.wait_many``, the ``wait_jobs`` step; PROTOCOL.md "Reading the
result") against a real redis-server and in-process simulated workers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from producer import AsyncClient, Client, JobNotFound, JobStatus, QueueKeys, WaitTimeout
from producer.protocol import refusal
from producer.scripts import source
from slotfill.testing import signals
from slotfill.testing.kill_soak import wait_all_terminal
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer


def _reqs(n: int, tokens: int = 4) -> list[dict[str, Any]]:
    return [{"prompt": f"p{i}", "max_tokens": tokens, "ignore_eos": True} for i in range(n)]


def test_every_result_exactly_once_finished_or_not(client: Client, inproc: Callable[..., Any]
                                                   ) -> None:
    inproc("a", max_num_seqs=4, headroom=0, sim_step_ms=5).wait_ready()
    ids = client.submit_many(_reqs(40, tokens=6))
    assert client.wait(ids[0], timeout=30).status is JobStatus.succeeded  # some already done
    got = client.wait_many([*ids, ids[3], ids[0]], timeout=60)  # repeats are one job
    assert list(got) == ids
    assert all(res.id == i and res.status is JobStatus.succeeded for i, res in got.items())
    assert all(res.usage.completion_tokens == 6 for res in got.values())


def test_an_unknown_id_raises_before_blocking(client: Client) -> None:
    known = client.submit("never runs: no worker", max_tokens=2).id
    t0 = time.monotonic()
    with pytest.raises(JobNotFound, match="nosuchjob"):
        client.wait_many([known, "nosuchjob"], timeout=20)
    assert time.monotonic() - t0 < 5
    with pytest.raises(JobNotFound):
        client.wait("nosuchjob", timeout=5)


def test_timeout_names_what_is_missing_and_keeps_what_came(client: Client) -> None:
    ids = client.submit_many(_reqs(3))  # no worker: they stay queued
    assert client.cancel(ids[0]) == "cancelled"
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout) as e:
        client.wait_many(ids, timeout=0.6)
    assert 0.5 < time.monotonic() - t0 < 5
    assert e.value.missing == sorted(ids[1:])
    assert list(e.value.results) == [ids[0]]
    assert e.value.results[ids[0]].status is JobStatus.cancelled
    with pytest.raises(WaitTimeout, match=ids[1]):
        client.wait(ids[1], timeout=0.3)


def test_a_job_cancelled_while_waited_on_wakes_the_waiter(client: Client, r: redis.Redis,
                                                           queue: str) -> None:
    ids = client.submit_many(_reqs(2))
    threading.Timer(0.3, lambda: [client.cancel(i) for i in ids]).start()
    t0 = time.monotonic()
    got = client.wait_many(ids, timeout=20)
    assert time.monotonic() - t0 < 10  # woken by the cancel, not the timeout
    assert {res.status for res in got.values()} == {JobStatus.cancelled}
    keys = QueueKeys.for_queue(queue)
    assert not any(r.exists(keys.done(i)) for i in ids)  # notify=waiters: no done list


def test_nobody_waiting_leaves_no_signal(client: Client, r: redis.Redis, queue: str,
                                         inproc: Callable[..., Any]) -> None:
    inproc("a").wait_ready()
    ids = client.submit_many(_reqs(10))
    assert wait_all_terminal(r, queue, ids, 30)
    base = QueueKeys.for_queue(queue).base
    assert list(r.scan_iter(f"{base}:done:*")) == []
    assert list(r.scan_iter(f"{base}:waiter:*")) == []


def test_a_record_without_notify_still_gets_its_done_list(client: Client, r: redis.Redis,
                                                          queue: str,
                                                          inproc: Callable[..., Any]) -> None:
    """Jobs an older submit_job wrote (no ``notify`` field) keep the done list older clients
    block on, and wait_many still serves them."""
    keys = QueueKeys.for_queue(queue)
    old, new = client.submit_many(_reqs(2))
    r.hdel(keys.job(old), "notify")
    inproc("a").wait_ready()
    got = client.wait_many([old, new], timeout=30)
    assert {res.status for res in got.values()} == {JobStatus.succeeded}
    assert r.lrange(keys.done(old), 0, -1) == [b"succeeded"]
    assert not r.exists(keys.done(new))


def test_the_notify_argument_is_the_submitters_choice(client: Client, r: redis.Redis,
                                                      queue: str,
                                                      inproc: Callable[..., Any]) -> None:
    """A caller of submit_job written to the earlier protocol (3 ARGV) keeps the done list it
    blocks on; ARGV[4] other than "waiters" or empty is refused and writes nothing."""
    keys = QueueKeys.for_queue(queue)
    key_list = [keys.stream("normal"), keys.job("raw1"), keys.idempotency("-"), *keys.streams,
                keys.config]
    body = '{"prompt": "raw", "max_tokens": 3, "ignore_eos": true}'
    with pytest.raises(ResponseError) as e:
        r.eval(source("submit_job"), 7, *key_list, "raw1", body, "", "done")
    assert "invalid_argument" in str(e.value) and not r.exists(keys.job("raw1"))
    assert [x.decode() for x in r.eval(source("submit_job"), 7, *key_list, "raw1", body, "")
            ] == ["ok", "raw1"]
    assert r.hget(keys.job("raw1"), "notify") is None
    inproc("a").wait_ready()
    done = wait_until(lambda: r.lrange(keys.done("raw1"), 0, -1), timeout=30,
                      what="the done list of a job submitted without ARGV[4]")
    assert done == [b"succeeded"]
    assert client.wait("raw1", timeout=5).status is JobStatus.succeeded


def test_the_async_client_waits_many(redis_server: RedisServer, queue: str,
                                     inproc: Callable[..., Any]) -> None:
    inproc("a", max_num_seqs=4, headroom=0).wait_ready()

    async def run() -> None:
        async with AsyncClient.from_url(redis_server.url, queue=queue) as ac:
            ids = await ac.submit_many(_reqs(20))
            got = await ac.wait_many(ids, timeout=60)
            assert list(got) == ids and all(v.id == k for k, v in got.items())
            assert (await ac.wait(ids[0], timeout=5)) == got[ids[0]]
            late = await ac.submit_many(_reqs(1))
            with pytest.raises(JobNotFound):
                await ac.wait_many([*late, "nosuchjob"], timeout=5)

    asyncio.run(run())


def test_a_sharded_queue_waits_per_shard(client: Client, r: redis.Redis,
                                         inproc: Callable[..., Any]) -> None:
    client.configure_queue(shards=3)
    inproc("a", max_num_seqs=8, headroom=0).wait_ready()
    ids = client.submit_many(_reqs(30))
    layout = client.layout()
    assert len({layout.for_job(i) for i in ids}) == 3  # every shard has some
    got = client.wait_many(ids, timeout=60)
    assert list(got) == ids and {v.status for v in got.values()} == {JobStatus.succeeded}


def test_a_stream_reader_of_a_queued_job_is_woken_by_its_end(
        client: Client, inproc: Callable[..., Any]) -> None:
    job = client.submit("plain", max_tokens=3, ignore_eos=True)  # queued: no token stream
    threading.Timer(0.8, lambda: inproc("a").wait_ready()).start()
    events = list(client.stream(job.id, timeout=30))
    assert events[-1].status is JobStatus.succeeded  # type: ignore[union-attr]


def _wait_jobs(r: redis.Redis, keys: list[str], args: list[Any]) -> Any:
    return r.register_script(source("wait_jobs"))(keys=keys, args=args)


@pytest.mark.parametrize("bad", [
    "arity", "token", "zero seconds", "long wait", "job id", "other queue's job",
    "waiter of another token", "not a waiter list"])
def test_wait_jobs_refuses_bad_keys_and_args(client: Client, r: redis.Redis, queue: str,
                                             bad: str) -> None:
    job = client.submit("x", max_tokens=2).id
    k = QueueKeys.for_queue(queue)
    keys, args = [k.waiter("tok"), k.job(job)], ["tok", 5, job]
    if bad == "arity":
        args = args[:2]
    elif bad == "token":
        keys, args = [k.waiter("t k"), k.job(job)], ["t k", 5, job]
    elif bad == "zero seconds":
        args[1] = 0
    elif bad == "long wait":
        args[1] = 86401
    elif bad == "job id":
        keys, args = [k.waiter("tok"), k.job("a:b")], ["tok", 5, "a:b"]
    elif bad == "other queue's job":
        keys[1] = QueueKeys.for_queue(queue + "x").job(job)
    elif bad == "waiter of another token":
        keys[0] = k.waiter("other")
    else:
        keys[0] = k.job(job)
    with pytest.raises(ResponseError) as e:
        _wait_jobs(r, keys, args)
    typed = refusal(e.value)
    assert typed is not None and typed.reason in ("invalid_argument", "invalid_key"), str(e)
    assert r.hget(k.job(job), "waiters") is None  # a refused call writes nothing


def test_wait_jobs_registers_once_per_token_and_drops_ended_waits(
        client: Client, r: redis.Redis, queue: str) -> None:
    k = QueueKeys.for_queue(queue)
    job = client.submit("x", max_tokens=2).id
    assert _wait_jobs(r, [k.waiter("a"), k.job(job)], ["a", 5, job]) == [1]
    assert _wait_jobs(r, [k.waiter("a"), k.job(job)], ["a", 9, job]) == [1]
    assert _wait_jobs(r, [k.waiter("b"), k.job(job)], ["b", 1, job]) == [1]
    tokens = [w.split(b"@")[0] for w in (r.hget(k.job(job), "waiters") or b"").split()]
    assert tokens == [b"a", b"b"]  # "a" renewed, not added twice
    wait_until(lambda: _wait_jobs(r, [k.waiter("c"), k.job(job)], ["c", 5, job]) == [1]
               and b"b@" not in (r.hget(k.job(job), "waiters") or b""),
               timeout=10, what="b's ended wait to be dropped")
    assert client.cancel(job) == "cancelled"
    pushed = r.lrange(k.waiter("a"), 0, -1)  # the result itself: no read after the pop
    assert pushed == r.lrange(k.waiter("c"), 0, -1) == [r.hget(k.job(job), "result")]
    assert not r.exists(k.waiter("b"))  # its wait was over: nothing pushed
    assert 60 < r.ttl(k.waiter("a")) <= 70
    assert signals.pushes(r, k, "a")[job] == 1
    reply = _wait_jobs(r, [k.waiter("d"), k.job(job), k.job("gone")], ["d", 5, job, "gone"])
    assert reply[1] == 0 and b'"cancelled"' in reply[0]
