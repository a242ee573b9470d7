"""The worker-side Lua steps on a real redis-server, one transition at a time (no worker
process): lease renewal never takes an entry back, release makes entries reclaimable at
once, reclaim isolates suspects and dead-letters poison, silent consumers are forgotten."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from producer import Client, QueueKeys
from producer.keys import GROUP
from slotfill.testing import signals as watch
from slotfill.testing.redis_server import RedisServer
from worker.claim import ClaimedJob, Disposition, LostClaims
from worker.store import Append, WorkerStore


@pytest.fixture
async def stores(redis_server: RedisServer, queue: str
                 ) -> AsyncIterator[tuple[WorkerStore, WorkerStore]]:
    conn = aioredis.Redis.from_url(redis_server.url)
    a, b = WorkerStore(conn, queue, "a"), WorkerStore(conn, queue, "b")
    await a.ensure_groups()
    yield a, b
    await conn.aclose()


def owner(r: redis.Redis, queue: str, entry: str) -> tuple[str, int]:
    p = r.xpending_range(QueueKeys.for_queue(queue).stream("normal"), GROUP, entry, entry, 1)
    return p[0]["consumer"].decode(), int(p[0]["times_delivered"])


async def test_renewal_keeps_a_lease_and_never_takes_one_back(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    a, b = stores
    job = client.submit(prompt="x")
    [row] = await a.start_jobs(5)
    await asyncio.sleep(0.05)
    assert await a.renew_leases([row]) == ["ok"]
    assert owner(r, queue, row.entry) == ("a", 1)  # renewed: no delivery counted
    await asyncio.sleep(0.06)
    [taken] = await b.reclaim_jobs(5, 0.05, 3, solo_allowed=True)
    assert taken.job_id == job.id and taken.deliveries == 2
    assert await a.renew_leases([row]) == ["lost"]
    assert owner(r, queue, row.entry) == ("b", 2)  # still b's
    client.cancel(job.id)
    assert await b.renew_leases([taken]) == ["cancel"]
    assert await b.finish(taken, "cancelled", "{}", 60)
    assert await a.renew_leases([row]) == ["done"]
    assert not await a.finish(row, "succeeded", "{}", 60)  # the late duplicate
    stats = r.hgetall(QueueKeys.for_queue(queue).stats)
    assert stats[b"duplicates_suppressed"] == b"1" and stats[b"reclaimed"] == b"1"


async def test_released_entries_are_reclaimable_at_once_and_crashes_are_charged(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    a, b = stores
    keys = QueueKeys.for_queue(queue)
    ids = [client.submit(prompt=f"p{i}").id for i in range(3)]
    rows = await a.start_jobs(5)
    assert await b.reclaim_jobs(5, 60, 3, solo_allowed=True) == []  # leased for a minute
    assert await a.release(rows[:1], 60, "engine_crash", alone=True) == 1
    assert await a.release(rows[1:], 60, "engine_crash") == 2
    # Suspects run alone: one per claim, and only for a worker that can run it now.
    assert await b.reclaim_jobs(5, 60, 3, solo_allowed=False) == []
    first = await b.reclaim_jobs(5, 60, 3, solo_allowed=True)
    assert len(first) == 1 and first[0].disposition is Disposition.run_alone
    assert first[0].job_id == ids[0]
    assert r.hget(keys.job(ids[0]), "solo_losses") == b"1"
    assert r.hget(keys.job(ids[1]), "solo_losses") is None
    hist = json.loads(r.hget(keys.job(ids[0]), "history") or b"[]")
    assert [h["event"] for h in hist] == ["engine_crash", "reclaimed"]
    # A second solo crash makes it poison: dead-lettered, whatever the delivery count.
    await b.release(first, 60, "engine_crash", alone=True)
    rest = await a.reclaim_jobs(5, 60, 10, solo_allowed=True)
    poisoned = [x for x in rest if x.job_id == ids[0]]
    assert poisoned and poisoned[0].disposition is Disposition.poisoned
    # ... and one of the other two, alone.
    assert sum(1 for x in rest if x.disposition is Disposition.run_alone) == 1


async def test_only_reported_engine_deaths_while_alone_count_against_a_job(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    """Lost in a batch, while held, or while running alone on a worker that vanished (killed,
    frozen): no evidence. From ``max_deliveries`` on it runs alone. Its engine dying twice
    while it was alone inside, each reported by that engine's worker, makes it poison. Past
    3 x ``max_deliveries`` deliveries it is poison whatever happened (the backstop)."""
    a, b = stores
    keys = QueueKeys.for_queue(queue)
    run, alone, poisoned = Disposition.run, Disposition.run_alone, Disposition.poisoned

    async def reclaim(store: WorkerStore) -> ClaimedJob:
        await asyncio.sleep(0.03)
        [got] = await store.reclaim_jobs(1, 0.02, 3, solo_allowed=True)
        return got

    def events() -> list[str]:
        return [h["event"] for h in json.loads(r.hget(keys.job(job.id), "history") or b"[]")]

    job = client.submit(prompt="x")
    assert len(await a.start_jobs(1)) == 1
    seen = []
    for store in (b, a, b, a):
        got = await reclaim(store)
        seen.append((got.deliveries, got.disposition))
    assert seen == [(2, run), (3, alone), (4, alone), (5, alone)]
    # Its worker vanishes twice while it runs alone (marked, never reported): not charged.
    for runner, taker in ((a, b), (b, a)):
        await runner.mark_solo_run(got)
        got = await reclaim(taker)
        assert got.disposition is alone, got
    assert got.deliveries == 7 and r.hget(keys.job(job.id), "solo_losses") is None
    assert events().count("vanished_alone") == 2
    # Its engine dies with it alone inside, twice, each death reported: poison.
    await a.release([got], 0.02, "engine_crash", alone=True)
    got = await reclaim(b)
    assert (got.deliveries, got.disposition) == (8, alone)
    assert r.hget(keys.job(job.id), "solo_losses") == b"1"
    await b.release([got], 0.02, "engine_crash", alone=True)
    got = await reclaim(a)
    assert (got.deliveries, got.disposition) == (9, poisoned)  # 9 is within the backstop
    await a.finish(got, "failed", "{}", 60, "poisoned")
    dead = r.xrange(keys.dead_letter)
    assert len(dead) == 1 and dead[0][1][b"solo_losses"] == b"2"
    assert events().count("engine_crash") == 2
    # The backstop: a second job, never charged, is poison past 9 deliveries.
    job = client.submit(prompt="y")
    assert len(await a.start_jobs(1)) == 1
    got_all = [await reclaim(b) for _ in range(9)]
    assert [g.disposition for g in got_all] == [run] + [alone] * 7 + [poisoned]


async def test_silent_consumers_with_nothing_pending_are_forgotten(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    a, b = stores
    client.submit(prompt="x")
    [row] = await b.start_jobs(1)  # b joins the group ...
    await b.finish(row, "succeeded", "{}", 60)  # ... and then holds nothing
    stream = QueueKeys.for_queue(queue).stream("normal")
    assert {c["name"] for c in r.xinfo_consumers(stream, GROUP)} == {b"b"}
    await asyncio.sleep(0.05)
    await a.reclaim_jobs(1, 1, 3, solo_allowed=True, forget_after_s=0.02)
    assert {c["name"] for c in r.xinfo_consumers(stream, GROUP)} == set()


def _evalsha_calls(r: redis.Redis) -> int:
    """Script runs (a call refused with NOSCRIPT, before the client loads the script, is
    not one)."""
    stats = r.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


async def test_jobs_finishing_together_are_written_in_one_script_call(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    a, _ = stores
    keys = QueueKeys.for_queue(queue)
    ids = client.submit_many([{"prompt": f"p{i}"} for i in range(6)])
    rows = await a.start_jobs(10)
    assert sorted(row.job_id for row in rows) == sorted(ids)
    watch.watch(r, keys, "t-watch", ids)

    async def finish_all() -> list[bool]:
        return list(await asyncio.gather(*(
            a.finish(row, "succeeded", json.dumps({"id": row.job_id}), 60) for row in rows)))

    before = _evalsha_calls(r)
    assert await finish_all() == [True] * 6
    assert _evalsha_calls(r) - before == 1  # one step for the six
    assert all(r.hget(keys.job(i), "status") == b"succeeded" for i in ids)
    assert not any(r.exists(keys.done(i)) for i in ids)  # notify=waiters: no done list
    assert sorted(watch.pushes(r, keys, "t-watch").elements()) == sorted(ids)
    assert 0 < r.ttl(keys.waiter("t-watch")) <= watch.WATCH_S + 60
    assert sum(r.xlen(s) for s in keys.streams) == 0  # acknowledged and deleted, each
    assert r.xpending(keys.stream(), GROUP)["pending"] == 0
    assert r.hget(keys.stats, "finished_succeeded") == b"6"
    # Sent again (as after a lost reply): still the writers' own, nothing counted twice.
    assert await finish_all() == [True] * 6
    assert r.hget(keys.stats, "finished_succeeded") == b"6"
    assert r.llen(keys.waiter("t-watch")) == 6 and not any(r.exists(keys.done(i)) for i in ids)


async def test_a_record_that_breaks_the_step_fails_only_its_own_write(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    a, _ = stores
    keys = QueueKeys.for_queue(queue)
    client.submit_many([{"prompt": f"p{i}"} for i in range(4)])
    rows = await a.start_jobs(10)
    bad = rows[2]
    r.delete(keys.job(bad.job_id))
    r.set(keys.job(bad.job_id), "not a hash")  # the step's first read of it fails
    got = await asyncio.gather(*(a.finish(row, "succeeded", "{}", 60) for row in rows),
                               return_exceptions=True)
    assert isinstance(got[2], redis.ResponseError) and "WRONGTYPE" in str(got[2])
    assert [got[i] for i in (0, 1, 3)] == [True] * 3
    assert r.xpending(keys.stream(), GROUP)["pending"] == 1  # only the bad one's entry
    assert r.hget(keys.stats, "finished_succeeded") == b"3"


async def test_an_append_redis_refuses_raises_its_error(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    # One call of a batched append fails inside the batch: the store raises that error (a
    # transient one becomes RedisUnavailable), never hands it on as a reply code.
    a, _ = stores
    keys = QueueKeys.for_queue(queue)
    client.submit_many([{"prompt": "s", "stream": True}] * 2)
    rows = await a.start_jobs(5)
    r.set(keys.tokens(rows[1].job_id), "not a stream")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await a.append_tokens([Append(row, "a", "[1]", 0, 1, 1) for row in rows], 100, 60, 60)


async def test_a_claim_whose_reply_was_lost_is_taken_back_by_its_own_worker_alone(
        stores: tuple[WorkerStore, WorkerStore], client: Client, r: redis.Redis,
        queue: str) -> None:
    """``reclaim_jobs`` with ``own``: only the caller's entries idle that long, as the same
    delivery and a new attempt; a peer's, and the caller's renewed ones, stay where they are."""
    a, b = stores
    lost, held, peers = (client.submit(prompt=p) for p in ("lost", "held", "peer"))
    [lost_row] = await a.start_jobs(1)  # its reply "lost": a does not hold it
    [held_row] = await a.start_jobs(1)
    [peer_row] = await b.start_jobs(1)
    assert [x.job_id for x in (lost_row, held_row, peer_row)] == [lost.id, held.id, peers.id]
    await asyncio.sleep(0.05)
    assert await a.renew_leases([held_row]) == ["ok"]
    [taken] = await a.reclaim_jobs(5, 0.04, 3, solo_allowed=True, own=True)
    assert (taken.job_id, taken.deliveries, taken.attempts) == (lost.id, 1, 2)
    assert taken.disposition is Disposition.run
    assert owner(r, queue, lost_row.entry) == ("a", 1)  # no delivery counted
    assert owner(r, queue, peer_row.entry) == ("b", 1)
    keys = QueueKeys.for_queue(queue)
    assert json.loads(r.hget(keys.job(lost.id), "history") or "[]")[-1]["event"] == "adopted"
    assert r.hget(keys.stats, "adopted") == b"1" and r.hget(keys.stats, "reclaimed") is None
    with pytest.raises(redis.ResponseError, match="invalid_argument"):
        r.evalsha(a._reclaim.sha, 3, *keys.streams, GROUP, "a", 1, "0", keys.base, 0, 3, 1,
                  3, 0, 9, "mine")


def test_lost_claims_are_swept_for_until_a_sweep_begins_idle_s_after_the_first_ended() -> None:
    lost = LostClaims(idle_s=0.5)
    lost.failed(redis.ResponseError("READONLY You can't write against a read only replica."))
    assert not lost.ready(0.0)  # an error reply: the claim ran nothing
    lost.failed(redis.TimeoutError("Timeout reading from 127.0.0.1:6379"))
    assert lost.ready(0.0)
    lost.swept(0.0, 0.1, 0)
    assert lost.due and not lost.ready(0.2) and lost.ready(0.4)  # sweeps idle_s / 2 apart
    lost.swept(0.4, 0.45, 0)  # began before 0.1 + 0.5: an entry claimed at 0.1 was not idle yet
    assert lost.due
    lost.swept(0.65, 0.7, 2)  # took two (as many as there were free slots): maybe more left
    assert lost.due
    lost.swept(0.95, 1.0, 0)
    assert not lost.due and not lost.ready(5.0)
    lost.failed(redis.ConnectionError("Connection reset by peer"))
    lost.swept(6.0, 6.1, 0)  # a new failure: its own first sweep
    assert lost.due
