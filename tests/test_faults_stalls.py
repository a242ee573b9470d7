"""Exact under stalls: redis-server and workers frozen (SIGSTOP) past the lease and past the
clients' socket timeout (lost replies), with streaming jobs and Celery callbacks. Every test
checks the invariant over every job (slotfill/testing/stream_check.py): one visible result,
and a token stream whose last attempt joins to exactly that result."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, QueueKeys
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer
from slotfill.testing.stream_check import check_jobs, read_stream

pytestmark = [pytest.mark.fault, pytest.mark.own_worker]

Q = "stall"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may freeze (the session's serves the other tests)."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(appendfsync=None, workdir=str(tmp_path / "redis")).start()
    try:
        yield server
    finally:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def _worker(url: str, name: str, tmp: Path, **settings: Any) -> WorkerProcess:
    cfg: dict[str, Any] = dict(queue=Q, engine="sim", sim_step_ms=10, max_num_seqs=8,
                               headroom=2, lease_seconds=2, heartbeat_seconds=0.5,
                               grace_seconds=10, stream_interval_ms=20)
    cfg.update(settings)
    return WorkerProcess(url, name, tmp / f"{name}.log", **cfg).start()


def _freeze(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _wait_tokens(r: redis.Redis, ids: list[str], at_least: int, timeout: float = 30.0) -> None:
    """Until every job's stream holds ``at_least`` tokens of its attempt."""
    keys = QueueKeys.for_queue(Q)
    wait_until(lambda: min(len(read_stream(r, keys.tokens(i)).ids) for i in ids) >= at_least,
               timeout=timeout, what=f"every job to stream {at_least} tokens")


def _wait_all(c: Client, ids: list[str], timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    for i in ids:
        c.wait(i, timeout=max(1.0, end - time.monotonic()))


def _stats(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(QueueKeys.for_queue(Q).stats).items()}


@pytest.mark.parametrize("frozen", ["redis", "worker"])
def test_a_stall_never_makes_a_lone_worker_reclaim_its_own_jobs(
        own_redis: RedisServer, tmp_path: Path, frozen: str) -> None:
    """Issue 12 case 1: one worker, lease 2 s, 6 streaming jobs; frozen 6 s (3 x lease)
    mid-stream: redis-server, or the worker's own process (as a loop starved by CPU work
    would be: on waking it renews before it sweeps)."""
    r = redis.Redis.from_url(own_redis.url)
    c = Client.from_url(own_redis.url, queue=Q)
    w = _worker(own_redis.url, "solo", tmp_path)
    try:
        w.wait_ready(60)
        ids = [c.submit("x", max_tokens=400 + 10 * k, ignore_eos=True, stream=True).id
               for k in range(6)]
        _wait_tokens(r, ids, 120)
        proc = own_redis.proc if frozen == "redis" else w.proc
        assert proc is not None
        _freeze(proc.pid, 6.0)
        _wait_all(c, ids)
        rep = check_jobs(r, Q, ids)
        stats = _stats(r)
    finally:
        w.stop(30)
    print(f"\n{frozen} frozen, one worker: {rep.mismatched_streams}/{rep.checked} streams "
          f"mismatched, attempts {Counter(rep.attempts.values())}, stats {stats}")
    assert rep.ok, rep.problems
    assert set(rep.attempts.values()) == {1}, rep.attempts
    assert stats.get("reclaimed", 0) == 0 and stats.get("duplicates_suppressed", 0) == 0
    assert "reclaimed (delivery" not in w.tail(400)


def _callbacks(broker: redis.Redis) -> Counter[str]:
    """Celery messages waiting in the broker's default queue, by task id."""
    out: Counter[str] = Counter()
    for raw in broker.lrange("celery", 0, -1):
        out[json.loads(raw)["headers"]["id"]] += 1
    return out


def test_lost_replies_duplicate_no_delta_and_lose_no_callback(
        own_redis: RedisServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """Issue 12 cases 2 and 3: two workers, Redis frozen 7 s (past the 5 s socket timeout:
    replies of writes that landed are lost, the writes are retried)."""
    broker_url = f"redis://127.0.0.1:{redis_server.port}/7"
    broker = redis.Redis.from_url(broker_url)
    broker.delete("celery")
    r = redis.Redis.from_url(own_redis.url)
    c = Client.from_url(own_redis.url, queue=Q)
    ws = [_worker(own_redis.url, n, tmp_path, celery_broker_url=broker_url) for n in "ab"]
    cb = {"celery_task": "backend.on_llm_result"}
    try:
        for w in ws:
            w.wait_ready(60)
        ids = c.submit_many([{"prompt": "x", "max_tokens": 300 + k, "ignore_eos": True,
                              "stream": True, "callback": cb} for k in range(16)])
        ids += c.submit_many([{"prompt": "y", "max_tokens": 3 + k % 5, "callback": cb}
                              for k in range(200)])
        _wait_tokens(r, ids[:8], 60)
        assert own_redis.proc is not None
        _freeze(own_redis.proc.pid, 7.0)
        _wait_all(c, ids)
        rep = check_jobs(r, Q, ids[:16])
        rep_plain = check_jobs(r, Q, ids[16:], streaming=False)
        stats = _stats(r)
        wait_until(lambda: sum(_callbacks(broker).values()) >= len(ids), timeout=30,
                   interval=0.1, what="a callback for every job")
        time.sleep(0.5)  # nothing more arrives
        sent = _callbacks(broker)
    finally:
        for w in ws:
            w.stop(30)
    logs = "".join(w.tail(5000) for w in ws)
    print(f"\nlost replies: {rep.mismatched_streams}/{rep.checked} streams mismatched, "
          f"{len(rep_plain.problems)}/{rep_plain.checked} plain jobs with problems, callbacks "
          f"{sum(sent.values())} for {len(ids)} jobs ({len(sent)} distinct), attempts "
          f"{Counter((rep.attempts | rep_plain.attempts).values())}, stats {stats}, "
          f"'duplicate result suppressed' lines {logs.count('duplicate result suppressed')}")
    assert rep.ok, rep.problems
    assert rep_plain.ok, rep_plain.problems
    assert {f"slotfill-{i}" for i in ids} == set(sent) and set(sent.values()) == {1}, (
        len(sent), [k for k, v in sent.items() if v != 1])
    re_executions = sum(a - 1 for a in (rep.attempts | rep_plain.attempts).values())
    assert stats.get("duplicates_suppressed", 0) <= re_executions
    assert "duplicate result suppressed" not in logs or re_executions > 0


def test_a_frozen_worker_publishes_nothing_its_stream_declared_void(
        own_redis: RedisServer, tmp_path: Path) -> None:
    """Issue 12 case 4: worker A frozen half-way through its jobs, for B's start and 2-3
    leases; B takes them over; A thaws (and would finish first). The result is B's, the one
    its stream shows. A is frozen before B starts: B's start once took 5 s on a loaded box,
    and A (4 s of jobs) had finished when it was to be frozen."""
    r = redis.Redis.from_url(own_redis.url)
    c = Client.from_url(own_redis.url, queue=Q)
    a = _worker(own_redis.url, "a", tmp_path, sim_step_ms=10)
    b: WorkerProcess | None = None
    try:
        a.wait_ready(60)
        ids = [c.submit("x", max_tokens=400 + 5 * k, ignore_eos=True, stream=True).id
               for k in range(4)]
        _wait_tokens(r, ids, 200)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            b = _worker(own_redis.url, "b", tmp_path, sim_step_ms=25)
            b.wait_ready(60)
            keys = QueueKeys.for_queue(Q)
            wait_until(lambda: all(r.hget(keys.job(i), "worker") == b"b" for i in ids),
                       timeout=30, what="b to take the jobs over")
            time.sleep(1.0)  # b streams a little of its own attempt first
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        _wait_all(c, ids)
        rep = check_jobs(r, Q, ids)
    finally:
        a.stop(30)
        if b is not None:
            b.stop(30)
    print(f"\nfrozen worker: {rep.mismatched_streams}/{rep.checked} streams mismatched, "
          f"workers {Counter(rep.workers.values())}, attempts {Counter(rep.attempts.values())}")
    assert rep.ok, rep.problems
    assert set(rep.workers.values()) == {"b"} and set(rep.attempts.values()) == {2}
    assert "lease lost to a peer" in a.tail(400)


def test_a_callback_whose_sender_died_is_sent_by_a_peer(
        redis_server: RedisServer, r: redis.Redis, queue: str, tmp_path: Path) -> None:
    """The outbox: a result published by a worker that died before sending its callback (its
    entry left in ``slotfill:{Q}:callbacks``) gets the callback from another worker, once;
    a callback sent normally leaves nothing behind."""
    broker_url = f"redis://127.0.0.1:{redis_server.port}/8"
    broker = redis.Redis.from_url(broker_url)
    broker.delete("celery")
    keys = QueueKeys.for_queue(queue)
    orphan = "0" * 31 + "1"
    r.hset(keys.job(orphan), mapping={
        "status": "succeeded", "callback": json.dumps({"celery_task": "backend.on_llm_result"}),
        "result": json.dumps({"id": orphan, "status": "succeeded", "text": "t1"})})
    r.zadd(keys.callbacks, {orphan: 1.0})
    w = WorkerProcess(redis_server.url, "sweeper", tmp_path / "w.log", queue=queue,
                      engine="sim", sim_step_ms=5, celery_broker_url=broker_url,
                      celery_redeliver_seconds=1).start()
    c = Client.from_url(redis_server.url, queue=queue)
    try:
        w.wait_ready(60)
        job = c.submit("x", max_tokens=3, callback={"celery_task": "backend.on_llm_result"})
        c.wait(job.id, timeout=30)
        wait_until(lambda: sum(_callbacks(broker).values()) >= 2 and not r.zcard(keys.callbacks),
                   timeout=30, interval=0.1, what="both callbacks sent, none left to send")
        time.sleep(2.5)  # past two sweeps: nothing more is sent
        sent = _callbacks(broker)
    finally:
        w.stop(30)
    assert sent == Counter({f"slotfill-{orphan}": 1, f"slotfill-{job.id}": 1})
    assert r.zcard(keys.callbacks) == 0


def test_a_soak_of_kills_freezes_and_stalls_keeps_every_promise(tmp_path: Path) -> None:
    """The mix (slotfill.testing.stall_soak, run longer for the figures in PROTOCOL.md):
    streaming jobs and callbacks while workers are killed and frozen and Redis stalls."""
    from slotfill.testing.stall_soak import soak

    rep = soak(events=6, jobs=600, log_dir=tmp_path, seed=7)
    print(f"\nstall soak: {rep}")
    assert rep.ok(), rep
    assert rep.jobs == 600 and rep.streaming_jobs > 0


def test_claims_whose_reply_was_lost_run_at_once_with_no_delivery_counted(
        own_redis: RedisServer, tmp_path: Path) -> None:
    """A lone worker with a backlog always has a ``start_jobs`` read on its way; Redis frozen
    7 s (past the worker's 5 s socket timeout) runs that read when it wakes and its reply is
    lost. The entries it claimed are the worker's own, unknown to it: it takes them back at
    once (``reclaim_jobs`` for its own entries) as the same delivery, not a lease (60 s) later
    as a redelivery."""
    r = redis.Redis.from_url(own_redis.url)
    c = Client.from_url(own_redis.url, queue=Q)
    w = _worker(own_redis.url, "solo", tmp_path, sim_step_ms=2, max_num_seqs=4, headroom=0,
                lease_seconds=60)
    try:
        w.wait_ready(60)
        ids = c.submit_many([{"prompt": "x", "max_tokens": 2 + k % 3} for k in range(1500)])
        wait_until(lambda: _stats(r).get("finished_succeeded", 0) >= 100, timeout=60,
                   what="the worker to get going")
        assert own_redis.proc is not None
        _freeze(own_redis.proc.pid, 7.0)
        thawed = time.monotonic()
        _wait_all(c, ids, timeout=50)  # well inside the lease
        took = time.monotonic() - thawed
        rep = check_jobs(r, Q, ids, streaming=False)
        stats = _stats(r)
    finally:
        w.stop(30)
    print(f"\nlost claim replies: every job done {took:.1f} s after the thaw, attempts "
          f"{Counter(rep.attempts.values())}, stats {stats}")
    assert rep.ok, rep.problems
    assert stats.get("adopted", 0) > 0, "no claim reply was lost: the test proved nothing"
    assert stats.get("reclaimed", 0) == 0, stats
    keys = QueueKeys.for_queue(Q)
    history = [json.loads(h) for i in ids if (h := r.hget(keys.job(i), "history"))]
    assert all(e.get("delivery", 1) == 1 for h in history for e in h), history[:3]
