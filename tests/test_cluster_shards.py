"""One logical queue split over a 3-master Redis Cluster (producer/shards.py): the shards'
slots land on three masters; both clients, ``slotfill submit`` and ``slotfill batch`` spread
jobs over them; workers (simulated engine) pull from every shard, home first, and every job
finishes exactly once; by-id calls (status, result, wait, stream, cancel through each
shard's control channel) find the job from its id; a worker whose home shard gets nothing
drains the others."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from producer import AsyncClient, Client, JobNotFound, JobStatus
from producer.connection import connect
from producer.shards import ShardLayout, read_layout, shard_index
from slotfill.cli.dead_letters import DeadLetters
from slotfill.cli.main import app
from slotfill.testing.cluster import LocalCluster
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from worker.shard_set import home_index

Q = "sq"
"""Served by two workers whose homes differ."""
LONE = "sd"
"""Served by one worker: jobs sent only to the shards that are not its home."""


def _names_with_homes(n: int, prefix: str) -> list[str]:
    """Worker names whose home shards are 0, 1, ... (one each)."""
    found: dict[int, str] = {}
    i = 0
    while not all(k in found for k in range(n)):
        found.setdefault(home_index(f"{prefix}{i}", 3), f"{prefix}{i}")
        i += 1
    return [found[k] for k in range(n)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3) as cl:
        yield cl


@pytest.fixture(scope="module")
def r(cluster: LocalCluster) -> Iterator[redis.Redis]:
    c = connect(cluster.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def layout(cluster: LocalCluster, r: redis.Redis) -> ShardLayout:
    res = CliRunner().invoke(app, ["configure", "--shards", "3", "--queue", Q,
                                   "--redis-url", cluster.url])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert [s["name"] for s in shown["shards"]] == list(read_layout(r, Q).names)
    assert len({s["master"] for s in shown["shards"]}) == 3
    with Client.from_url(cluster.url, queue=LONE) as c:
        c.configure_queue(shards=3)
    return read_layout(r, Q)


@pytest.fixture(scope="module")
def workers(cluster: LocalCluster, layout: ShardLayout,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    d = tmp_path_factory.mktemp("shard-workers")
    names = _names_with_homes(2, "w")
    lone = _names_with_homes(1, "lone")[0]
    ws = {n: WorkerProcess(cluster.url, n, d / f"{n}.log", queue=Q, engine="sim",
                           sim_step_ms=5, max_num_seqs=8, headroom=4, lease_seconds=2,
                           heartbeat_seconds=0.5) for n in names}
    ws[lone] = WorkerProcess(cluster.url, lone, d / f"{lone}.log", queue=LONE, engine="sim",
                             sim_step_ms=5, max_num_seqs=8, headroom=4, lease_seconds=2,
                             heartbeat_seconds=0.5)
    for w in ws.values():
        w.start()
    try:
        for w in ws.values():
            w.wait_ready(60)
        yield ws
    finally:
        for w in ws.values():
            w.stop(10)


def _shard_of(r: redis.Redis, layout: ShardLayout, job_id: str) -> int:
    """Where the job's record really is (not where routing says it should be)."""
    held = [i for i, k in enumerate(layout.all_keys) if r.exists(k.job(job_id))]
    assert len(held) == 1, (job_id, held)
    return held[0]


def _finished(r: redis.Redis, layout: ShardLayout) -> int:
    total = 0
    for k in layout.all_keys:
        stats: dict[bytes, bytes] = r.hgetall(k.stats)  # type: ignore[assignment]
        total += sum(int(v) for f, v in stats.items() if f.startswith(b"finished_"))
    return total


def _unfinished(r: redis.Redis, layout: ShardLayout) -> int:
    return sum(int(r.xlen(s)) for k in layout.all_keys for s in k.streams)


def test_the_shards_live_on_three_masters(cluster: LocalCluster, layout: ShardLayout) -> None:
    assert layout.n == 3 and layout.names[0] == Q
    ports = {cluster.master_of_key(k.base).port for k in layout.all_keys}
    assert len(ports) == 3


def _idem_keys(layout: ShardLayout, shard: int, count: int, tag: str) -> list[str]:
    """Idempotency keys that route to ``shard``."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        key = f"{tag}-{i}"
        if shard_index(key, layout.n) == shard:
            out.append(key)
        i += 1
    return out


def test_jobs_spread_and_finish_exactly_once(cluster: LocalCluster, r: redis.Redis,
                                             layout: ShardLayout,
                                             workers: dict[str, WorkerProcess]) -> None:
    before = _finished(r, layout)
    with Client.from_url(cluster.url, queue=Q) as c:
        sync_ids = c.submit_many([{"prompt": f"p{i}", "max_tokens": 4} for i in range(90)],
                                 chunk=40)
        idem = [c.submit("k", max_tokens=3, idempotency_key=f"sync-{i}") for i in range(6)]
        again = c.submit("k", max_tokens=3, idempotency_key="sync-0")
        assert again.id == idem[0].id and not again.created

    async def async_side() -> list[str]:
        async with AsyncClient.from_url(cluster.url, queue=Q) as ac:
            ids = await ac.submit_many([{"prompt": "a", "max_tokens": 4}] * 30)
            one = await ac.submit("b", max_tokens=3, idempotency_key="async-0")
            same = await ac.submit("b", max_tokens=3, idempotency_key="async-0")
            assert same.id == one.id and not same.created
            results = [await ac.wait(i, timeout=60) for i in [*ids, one.id]]
            assert {x.status for x in results} == {JobStatus.succeeded}
            return [*ids, one.id]

    async_ids = asyncio.run(async_side())
    for ids in (sync_ids, async_ids):
        spread = [0, 0, 0]
        for j in ids:
            spread[_shard_of(r, layout, j)] += 1
            assert _shard_of(r, layout, j) == shard_index(j, 3)
        assert min(spread) > 0, spread
    for j in (x.id for x in idem):  # the idempotency key picked the shard, the id follows
        assert _shard_of(r, layout, j) == shard_index(j, 3)
    all_ids = [*sync_ids, *(x.id for x in idem), *async_ids]
    with Client.from_url(cluster.url, queue=Q) as c:
        assert {c.wait(j, timeout=60).status for j in all_ids} == {JobStatus.succeeded}
    wait_until(lambda: _finished(r, layout) - before == len(all_ids), timeout=30,
               what="every job counted finished once")
    wait_until(lambda: _unfinished(r, layout) == 0, timeout=30, what="every entry acked")
    served: set[str] = set()
    for j in all_ids:
        k = layout.keys(_shard_of(r, layout, j))
        attempts, worker, notify = r.hmget(k.job(j), "attempts", "worker", "notify")
        # Ran once (published once: the finished counters above); its waiters were woken,
        # no done list written (notify=waiters).
        assert attempts == b"1" and notify == b"waiters" and not r.exists(k.done(j)), j
        served.add(worker.decode() if isinstance(worker, bytes) else str(worker))
    assert served <= set(workers) and len(served) == 2  # both workers of Q took part


def _wait_running(c: Client, job_id: str) -> None:
    wait_until(lambda: c.status(job_id) is JobStatus.running, timeout=20, interval=0.01,
               what="the long job to run")


def test_by_id_calls_find_the_shard(cluster: LocalCluster, r: redis.Redis,
                                    layout: ShardLayout,
                                    workers: dict[str, WorkerProcess]) -> None:
    with Client.from_url(cluster.url, queue=Q) as c:
        job = c.submit("stream me", max_tokens=12, stream=True)
        events = list(c.stream(job.id, timeout=30))
        final: Any = events[-1]
        assert final.status is JobStatus.succeeded
        assert "".join(getattr(e, "text", "") for e in events[:-1]) == final.text
        assert c.result(job.id) == final and c.status(job.id) is JobStatus.succeeded
        # Both workers listen on every shard's control channel once they have read the
        # layout (at a heartbeat); before that a cancel is still caught by the lease
        # renewal, but this test is about the channel (CI once cancelled one that way).
        for shard in range(layout.n):
            channel = layout.keys(shard).control
            node = r.get_node_from_key(channel)
            wait_until(lambda ch=channel, nd=node: int(r.execute_command(
                "PUBSUB", "SHARDNUMSUB", ch, target_nodes=nd)[1]) >= 2, timeout=20,
                what=f"both workers on shard {shard}'s control channel")
        longs = [c.submit("long", max_tokens=400, idempotency_key=_idem_keys(
            layout, shard, 1, "long")[0]) for shard in range(3)]
        assert sorted(_shard_of(r, layout, j.id) for j in longs) == [0, 1, 2]
        for j in longs:
            _wait_running(c, j.id)
            assert c.cancel(j.id) == "requested"
            assert c.wait(j.id, timeout=10).status is JobStatus.cancelled
        logs = "".join(w.log_path.read_text() for w in workers.values() if w.queue == Q)
        for j in longs:  # heard on each shard's own sharded control channel
            assert f"job {j.id} cancel requested (control channel)" in logs
        with pytest.raises(JobNotFound):
            c.status("0" * 32)

    async def async_side() -> None:
        async with AsyncClient.from_url(cluster.url, queue=Q) as ac:
            one = await ac.submit("s", max_tokens=6, stream=True)
            got = [e async for e in ac.stream(one.id, timeout=30)]
            last: Any = got[-1]
            assert last.status is JobStatus.succeeded
            assert await ac.status(one.id) is JobStatus.succeeded
            assert await ac.cancel(one.id) == "finished"

    asyncio.run(async_side())


def test_wait_many_over_every_shard(cluster: LocalCluster, r: redis.Redis,
                                    layout: ShardLayout,
                                    workers: dict[str, WorkerProcess]) -> None:
    """One wait_many over jobs of the three shards (three masters): one wait_jobs step and
    one waiter list per shard, each on its own master."""
    with Client.from_url(cluster.url, queue=Q) as c:
        ids = c.submit_many([{"prompt": f"w{i}", "max_tokens": 8} for i in range(45)])
        assert sorted({_shard_of(r, layout, j) for j in ids}) == [0, 1, 2]
        got = c.wait_many(ids, timeout=60)
        assert list(got) == ids and {v.status for v in got.values()} == {JobStatus.succeeded}
        with pytest.raises(JobNotFound):
            c.wait_many([ids[0], "0" * 32], timeout=5)

    async def async_side() -> None:
        async with AsyncClient.from_url(cluster.url, queue=Q) as ac:
            more = await ac.submit_many([{"prompt": "a", "max_tokens": 6}] * 15)
            done = await ac.wait_many(more, timeout=60)
            assert {v.status for v in done.values()} == {JobStatus.succeeded}

    asyncio.run(async_side())


def test_cli_submit_batch_and_status(cluster: LocalCluster, r: redis.Redis,
                                     layout: ShardLayout, workers: dict[str, WorkerProcess],
                                     tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["submit", "hello", "--max-tokens", "3",
                                   "--queue", Q, "--redis-url", cluster.url])
    assert res.exit_code == 0, res.output
    job_id = res.output.strip().splitlines()[-1]
    # No --queue: the job is searched among the known queues, every shard of each.
    res = CliRunner().invoke(app, ["wait", job_id, "--redis-url", cluster.url])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["status"] == "succeeded"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                       "url": "/v1/completions",
                                       "body": {"prompt": f"p{i}", "max_tokens": 3}}) + "\n"
                           for i in range(24)))
    args = ["batch", "submit", str(inp), "--out", str(out), "--queue", Q,
            "--redis-url", cluster.url, "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"c{i}" for i in range(24))
    assert {x["response"]["status_code"] for x in lines} == {200}
    shards = {_shard_of(r, layout, x["id"].removeprefix("batch_req_")) for x in lines}
    assert shards == {0, 1, 2}
    again = CliRunner().invoke(app, args)  # resumed: nothing submitted twice
    assert again.exit_code == 0, again.output
    assert len(out.read_text().splitlines()) == 24
    st = subprocess.run([sys.executable, "-m", "slotfill", "status", "--json",
                         "--redis-url", cluster.url], capture_output=True, text=True,
                        timeout=60)
    assert st.returncode == 0, st.stderr
    seen = {q["queue"]: q for q in json.loads(st.stdout)}
    assert not set(layout.names[1:]) & set(seen)  # shards are not queues of their own
    assert seen[Q]["shards"] == list(layout.names) and len(seen[Q]["workers"]) == 2
    # The sum over every shard's counters, and this test's own 25 jobs at least (earlier
    # tests of the module add theirs, unless they ran on another xdist worker).
    per_shard = [int(r.hget(k.stats, "finished_succeeded") or 0) for k in layout.all_keys]
    assert seen[Q]["finished"]["succeeded"] == sum(per_shard) >= 25, per_shard


def test_a_worker_whose_home_is_empty_drains_the_others(
        cluster: LocalCluster, r: redis.Redis, workers: dict[str, WorkerProcess]) -> None:
    lone = next(n for n, w in workers.items() if w.queue == LONE)
    layout = read_layout(r, LONE)
    home = home_index(lone, 3)
    beat = r.hget(layout.keys(0).worker(lone), "home_shard")
    assert beat == layout.names[home].encode()
    with Client.from_url(cluster.url, queue=LONE) as c:
        keys = [k for s in range(3) if s != home for k in _idem_keys(layout, s, 10, "away")]
        ids = [c.submit("x", max_tokens=3, idempotency_key=k).id for k in keys]
        assert {c.wait(j, timeout=60).status for j in ids} == {JobStatus.succeeded}
    assert all(_shard_of(r, layout, j) != home for j in ids)
    assert {r.hget(layout.for_job(j).job(j), "worker") for j in ids} == {lone.encode()}


def test_dead_letters_of_every_shard(r: redis.Redis, layout: ShardLayout,
                                     workers: dict[str, WorkerProcess]) -> None:
    """An entry that is no job, on shard 2: dead-lettered there, listed under the queue."""
    entry = r.xadd(layout.keys(2).stream(), {"junk": "not a job"})
    dl = DeadLetters(r, Q)
    wait_until(lambda: dl.size() >= 1, timeout=20, what="the entry dead-lettered")
    [d] = [x for x in dl.entries() if x.fields.get("entry") == _s(entry)]
    assert dl.shard_of(d) == layout.keys(2) and dl.get(d.id) == d
    assert "malformed" in d.fields.get("reason", "")


def _s(x: object) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
