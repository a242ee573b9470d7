"""A job's life on workers with the step-simulating engine and short leases: leases and
reclaim, deadlines, cancellation, priorities, idempotency, backpressure and graceful drain.

Workers run in-process (``slotfill.testing.inproc``) except where a process must die or take
a real signal (those tests are marked ``fault`` and use worker processes)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from producer import Client, JobStatus, QueueFull, QueueKeys
from slotfill.testing import signals as watch
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

SIM_DEFAULTS: dict[str, Any] = dict(engine="sim", sim_step_ms=10, max_num_seqs=4, headroom=2,
                                    lease_seconds=2, heartbeat_seconds=0.5, grace_seconds=10)


class AnyWorker(Protocol):
    def wait_ready(self, timeout: float = ...) -> object: ...
    def stop(self, timeout: float = ...) -> int | None: ...


def sim_worker(url: str, queue: str, tmp: Path, name: str, **settings: Any) -> WorkerProcess:
    """A worker process (for tests in which it must die or take a real signal)."""
    cfg: dict[str, Any] = {**SIM_DEFAULTS, "queue": queue, **settings}
    return WorkerProcess(url, name, tmp / f"{name}.log", **cfg).start()


def inproc_worker(url: str, queue: str, name: str, **settings: Any) -> InprocWorker:
    """The same worker in this process."""
    return InprocWorker(url, name, **{**SIM_DEFAULTS, "queue": queue, **settings}).start()


@contextlib.contextmanager
def workers(*ws: AnyWorker) -> Iterator[tuple[AnyWorker, ...]]:
    try:
        for w in ws:
            w.wait_ready(60)
        yield ws
    finally:
        for w in ws:
            w.stop(30)


def job_field(r: redis.Redis, queue: str, job_id: str, name: str) -> str | None:
    v = r.hget(QueueKeys.for_queue(queue).job(job_id), name)
    return v.decode() if v is not None else None


def wait_status(c: Client, job_id: str, status: JobStatus, timeout: float = 10.0) -> None:
    wait_until(lambda: c.status(job_id) is status, timeout=timeout, interval=0.01,
               what=f"job {job_id} to become {status.value}")


def wait_for_steps(r: redis.Redis, queue: str, consumer: str, timeout: float = 10.0) -> None:
    """Until the worker's heartbeat reports engine steps (so a running job has tokens)."""
    key = QueueKeys.for_queue(queue).worker(consumer)
    wait_until(lambda: int(r.hget(key, "steps") or 0) > 0, timeout=timeout,
               what=f"{consumer}'s heartbeat to report engine steps")


def stats(r: redis.Redis, queue: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(QueueKeys.for_queue(queue).stats).items()}


# -- leases and reclaim ----------------------------------------------------------------------

def test_a_long_generation_is_never_stolen_from_a_live_worker(
        redis_server: RedisServer, client: Client, r: redis.Redis, queue: str,
        tmp_path: Path) -> None:
    """A 4 s job under a 1 s lease, with an idle peer sweeping for idle entries: the lease is
    renewed every third of a lease, so the peer never takes it."""
    a = inproc_worker(redis_server.url, queue, "a", lease_seconds=1, sim_step_ms=20)
    with workers(a):
        job = client.submit(prompt="long", max_tokens=200)
        wait_status(client, job.id, JobStatus.running)
        b = inproc_worker(redis_server.url, queue, "b", lease_seconds=1)
        with workers(b):
            res = client.wait(job.id, timeout=30)
    assert res.status is JobStatus.succeeded and res.usage.completion_tokens == 200
    assert res.worker == "a" and res.attempts == 1
    assert stats(r, queue).get("reclaimed", 0) == 0


@pytest.mark.fault
def test_a_killed_workers_jobs_are_reclaimed_by_a_peer_within_the_lease(
        redis_server: RedisServer, client: Client, r: redis.Redis, queue: str,
        tmp_path: Path) -> None:
    lease = 2.0
    a = sim_worker(redis_server.url, queue, tmp_path, "a", lease_seconds=lease, sim_step_ms=20)
    with workers(a):
        ids = client.submit_many([{"prompt": "x", "max_tokens": 100} for _ in range(4)])
        for i in ids:
            wait_status(client, i, JobStatus.running)
        assert {job_field(r, queue, i, "worker") for i in ids} == {"a"}
        b = inproc_worker(redis_server.url, queue, "b2", lease_seconds=lease, sim_step_ms=5)
        b.wait_ready(30)
        a.kill()
        killed_at = time.monotonic()
        taken = {}
        while len(taken) < len(ids):
            for i in ids:
                if i not in taken and job_field(r, queue, i, "worker") == "b2":
                    taken[i] = time.monotonic() - killed_at
            assert time.monotonic() - killed_at < 3 * lease, taken
            time.sleep(0.02)
        results = [client.wait(i, timeout=30) for i in ids]
        b.stop(10)
    # Idle past the lease, then within one sweep period (a quarter lease), plus slack.
    assert max(taken.values()) <= lease * 1.25 + 0.75, taken
    assert all(res.status is JobStatus.succeeded and res.attempts == 2 for res in results)
    assert all(res.worker == "b2" and res.usage.completion_tokens == 100 for res in results)


# -- deadlines -------------------------------------------------------------------------------

def test_a_job_not_started_by_its_deadline_expires_without_running(
        redis_server: RedisServer, client: Client, r: redis.Redis, queue: str,
        tmp_path: Path) -> None:
    late = client.submit(prompt="too late", max_tokens=5, timeout=0.2)
    fine = client.submit(prompt="in time", max_tokens=5, timeout=60)
    deadline = float(job_field(r, queue, late.id, "deadline") or 0)
    assert deadline > 0
    wait_until(lambda: time.time() > deadline + 0.1, what="the deadline to pass")
    with workers(inproc_worker(redis_server.url, queue, "a")):
        res = client.wait(late.id, timeout=10)
        assert client.wait(fine.id, timeout=10).status is JobStatus.succeeded
    assert res.status is JobStatus.expired
    assert res.error is not None and res.error.code == "expired"
    assert res.usage.completion_tokens == 0 and res.timings.started_at is None


def test_a_job_running_at_its_deadline_is_aborted_with_its_partial_text(
        redis_server: RedisServer, client: Client, queue: str, tmp_path: Path) -> None:
    with workers(inproc_worker(redis_server.url, queue, "a")):
        job = client.submit(prompt="slow", max_tokens=400, timeout=0.6)  # 4 s of steps
        other = client.submit(prompt="neighbour", max_tokens=30)
        res = client.wait(job.id, timeout=10)
        assert client.wait(other.id, timeout=10).status is JobStatus.succeeded
    assert res.status is JobStatus.expired and res.finish_reason == "expired"
    assert 0 < res.usage.completion_tokens < 400
    assert res.text.startswith("t1 t2")
    t = res.timings
    assert t.started_at and t.finished_at and t.queued_at
    assert t.finished_at - t.queued_at < 1.2


# -- cancellation ----------------------------------------------------------------------------

def test_a_cancelled_queued_job_never_runs(redis_server: RedisServer, client: Client,
                                           r: redis.Redis, queue: str, tmp_path: Path) -> None:
    w = inproc_worker(redis_server.url, queue, "a", max_num_seqs=1, headroom=0)
    with workers(w):
        busy = client.submit(prompt="busy", max_tokens=60)
        wait_status(client, busy.id, JobStatus.running)
        queued = client.submit(prompt="never", max_tokens=5)
        assert client.status(queued.id) is JobStatus.queued
        watch.watch(r, QueueKeys.for_queue(queue), "t-watch", [queued.id])
        assert client.cancel(queued.id) == "cancelled"
        after = client.submit(prompt="after", max_tokens=5)
        assert client.wait(after.id, timeout=10).status is JobStatus.succeeded
        res = client.wait(queued.id, timeout=1)
    assert res.status is JobStatus.cancelled
    assert job_field(r, queue, queued.id, "started_at") is None
    assert job_field(r, queue, queued.id, "attempts") == "0"
    # Its end was pushed once to the waiter registered before it, and no done list is kept.
    assert watch.pushes(r, QueueKeys.for_queue(queue), "t-watch")[queued.id] == 1
    assert r.llen(QueueKeys.for_queue(queue).done(queued.id)) == 0


def test_a_running_job_is_aborted_within_one_step_of_its_cancellation(
        redis_server: RedisServer, client: Client, r: redis.Redis, queue: str) -> None:
    with workers(inproc_worker(redis_server.url, queue, "a", sim_step_ms=20)):
        job = client.submit(prompt="long", max_tokens=500)
        wait_status(client, job.id, JobStatus.running)
        wait_for_steps(r, queue, "a")
        t_cancel = time.time()
        assert client.cancel(job.id) == "requested"
        res = client.wait(job.id, timeout=5)
        assert client.cancel(job.id) == "finished"
    assert res.status is JobStatus.cancelled and res.finish_reason == "cancelled"
    assert 0 < res.usage.completion_tokens < 500
    assert res.timings.finished_at is not None
    # One 20 ms step, the pub/sub hop and the result write; generous for a busy 2-core box.
    assert res.timings.finished_at - t_cancel < 0.3


def test_a_cancel_missed_by_the_control_channel_is_found_by_lease_renewal(
        redis_server: RedisServer, client: Client, r: redis.Redis, queue: str,
        tmp_path: Path) -> None:
    """The worker was not listening when the cancel was published (Redis restart, a cancel
    that overtook the job): the flag in the job record is seen at the next renewal."""
    w = inproc_worker(redis_server.url, queue, "a", lease_seconds=1.5, sim_step_ms=20)
    with workers(w):
        job = client.submit(prompt="long", max_tokens=500)
        wait_status(client, job.id, JobStatus.running)
        t0 = time.time()
        r.hset(QueueKeys.for_queue(queue).job(job.id), "cancel_requested", t0)  # no PUBLISH
        res = client.wait(job.id, timeout=5)
    assert res.status is JobStatus.cancelled
    assert f"job {job.id} cancel requested (lease renewal)" in w.log_text()
    assert res.timings.finished_at is not None and res.timings.finished_at - t0 < 1.5


# -- priorities, idempotency, backpressure ---------------------------------------------------

def test_high_priority_jobs_are_pulled_first(redis_server: RedisServer, client: Client,
                                             queue: str, tmp_path: Path) -> None:
    order = ["low", "normal", "high"] * 4
    jobs = [(p, client.submit(prompt=p, max_tokens=2, priority=p).id) for p in order]
    with workers(inproc_worker(redis_server.url, queue, "a", max_num_seqs=1, headroom=0)):
        results = {i: client.wait(i, timeout=10) for _, i in jobs}
    started = sorted(jobs, key=lambda pj: results[pj[1]].timings.started_at or 0)
    assert [p for p, _ in started] == ["high"] * 4 + ["normal"] * 4 + ["low"] * 4


def test_an_idempotent_submit_runs_once(redis_server: RedisServer, client: Client,
                                        r: redis.Redis, queue: str, tmp_path: Path) -> None:
    with workers(inproc_worker(redis_server.url, queue, "a")):
        a = client.submit(prompt="pay", max_tokens=3, idempotency_key="invoice-7")
        watch.watch(r, QueueKeys.for_queue(queue), "t-watch", [a.id])
        b = client.submit(prompt="pay", max_tokens=3, idempotency_key="invoice-7")
        res = client.wait(a.id, timeout=10)
        c = client.submit(prompt="pay", max_tokens=3, idempotency_key="invoice-7")
    assert a.id == b.id == c.id and a.created and not b.created and not c.created
    keys = QueueKeys.for_queue(queue)
    notify, waiters = r.hmget(keys.job(a.id), "notify", "waiters")
    assert res.attempts == 1 and watch.problem(
        a.id, notify, waiters, int(r.llen(keys.done(a.id))), watch.pushes(r, keys, "t-watch"),
        "t-watch") is None  # published once
    assert stats(r, queue).get("finished_succeeded") == 1


def test_overload_at_twice_the_cap_refuses_at_submit_and_drops_nothing(
        redis_server: RedisServer, r: redis.Redis, queue: str, tmp_path: Path) -> None:
    cap = 24
    c = Client.from_url(redis_server.url, queue=queue)
    c.configure_queue(max_pending=cap)
    keys = QueueKeys.for_queue(queue)
    peak = {"n": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["n"] = max(peak["n"], sum(int(r.xlen(s)) for s in keys.streams))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    reqs = [{"prompt": f"p{i}", "max_tokens": 20} for i in range(2 * cap)]
    accepted: list[str | None] = [None] * len(reqs)
    refusals = 0
    with workers(inproc_worker(redis_server.url, queue, "a")):
        while any(a is None for a in accepted):
            todo = [n for n, a in enumerate(accepted) if a is None]
            try:
                ids = c.submit_many([reqs[n] for n in todo])
                got: list[str | None] = list(ids)
            except QueueFull as e:
                refusals += 1
                got = list(e.accepted or [])
                got += [None] * (len(todo) - len(got))
                time.sleep(0.05)
            for n, i in zip(todo, got, strict=True):
                accepted[n] = i
        results = [c.wait(str(i), timeout=30) for i in accepted]
    stop.set()
    sampler.join()
    assert refusals >= 1
    assert len(set(accepted)) == 2 * cap
    assert all(res.status is JobStatus.succeeded for res in results)
    assert peak["n"] <= cap


# -- graceful drain --------------------------------------------------------------------------

def test_sigterm_finishes_in_flight_work_within_the_grace_period(
        redis_server: RedisServer, client: Client, queue: str, tmp_path: Path) -> None:
    """SIGTERM runs the handler the worker registered (in-process: the same handler, called
    by the test; a real SIGTERM to a process: the next test)."""
    # A lease longer than the drain: with the default 2 s, a test process starved of CPU for
    # 2 s let b2 reclaim a job a was still finishing (seen once, under load): a second run.
    a = inproc_worker(redis_server.url, queue, "a", grace_seconds=10, lease_seconds=10)
    with workers(a):
        ids = client.submit_many([{"prompt": "x", "max_tokens": 50 + 10 * k}
                                  for k in range(12)])

        def six_held() -> list[str]:
            running = [i for i in ids if client.status(i) is JobStatus.running]
            return running if len(running) >= 6 else []

        # a holds 6 (its capacity); the other 6 wait in Redis.
        held = wait_until(six_held, what="a to hold 6 jobs")
        assert len(held) == 6
        b = inproc_worker(redis_server.url, queue, "b2", lease_seconds=10)
        b.wait_ready(30)
        assert a.stop(30) == 0
        results = {i: client.wait(i, timeout=30) for i in ids}
        b.stop(10)
    # Nothing was aborted or run twice: every job ran once, where it started.
    assert all(res.status is JobStatus.succeeded and res.attempts == 1
               for res in results.values())
    assert all(results[i].worker == "a" for i in held)
    assert "b2" in {res.worker for res in results.values()}  # the rest waited for a peer
    assert "0 unfinished jobs handed back" in a.tail(5)


@pytest.mark.fault  # a real SIGTERM to a worker process
def test_sigterm_past_the_grace_period_hands_jobs_back_for_a_quick_reclaim(
        redis_server: RedisServer, client: Client, queue: str, tmp_path: Path) -> None:
    # A long lease: a reclaim that waited for it would take ~20 s, the handed-back one takes a
    # quarter-lease sweep plus 150 short steps, so the bound below holds on a loaded box too.
    lease = 20.0
    a = sim_worker(redis_server.url, queue, tmp_path, "a", grace_seconds=0.3,
                   lease_seconds=lease, sim_step_ms=20)
    with workers(a):
        ids = client.submit_many([{"prompt": "x", "max_tokens": 150} for _ in range(3)])
        for i in ids:
            wait_status(client, i, JobStatus.running)
        b = inproc_worker(redis_server.url, queue, "b2", lease_seconds=lease)
        b.wait_ready(30)
        t0 = time.monotonic()
        assert a.stop(30) == 0
        assert "drained; 3 unfinished jobs handed back" in a.tail(5)
        results = [client.wait(i, timeout=30) for i in ids]
        elapsed = time.monotonic() - t0
        b.stop(10)
    assert all(res.status is JobStatus.succeeded and res.worker == "b2" for res in results)
    assert all(res.attempts == 2 for res in results)
    # Handed back idle-past-the-lease: taken at the peer's next sweep (a quarter lease),
    # not a whole lease later; then 150 steps of 5 ms.
    assert elapsed < lease, elapsed


# -- waiting ---------------------------------------------------------------------------------

async def test_a_wait_longer_than_the_socket_timeout_blocks_in_slices(
        redis_server: RedisServer, client: Client, queue: str) -> None:
    """A wait longer than the connection's socket timeout (redis-py 8 gives connections 5 s;
    1 s here, set in the URL, so the test waits 1.5 s instead of 6) must still end in
    WaitTimeout (sync and async clients), not in a socket timeout."""
    import asyncio

    from producer import AsyncClient, WaitTimeout

    job = client.submit(prompt="nobody serves this queue")
    url = redis_server.url + "?socket_timeout=1"

    def sync_wait() -> float:
        with Client.from_url(url, queue=queue) as c:
            t0 = time.monotonic()
            with pytest.raises(WaitTimeout):
                c.wait(job.id, timeout=1.5)
            return time.monotonic() - t0

    async def async_wait() -> float:
        async with AsyncClient.from_url(url, queue=queue) as ac:
            t0 = time.monotonic()
            with pytest.raises(WaitTimeout):
                await ac.wait(job.id, timeout=1.5)
            return time.monotonic() - t0

    took = await asyncio.gather(asyncio.to_thread(sync_wait), async_wait())
    assert all(1.4 <= t < 3.0 for t in took), took
    # With nothing in the URL the slices stay under redis-py's 5 s likewise.
    from producer.connection import connection_kwargs
    from producer.protocol import block_slice

    assert block_slice(6.0, connection_kwargs(client.redis)) < 5.0
