"""Every command path against a 3-master Redis Cluster (``redis+cluster://``, one replica
each): submit, batch submit, wait, stream, cancel through the sharded control channel, the
asyncio client, ``slotfill batch``, ``replica_acks`` (``WAIT`` on the queue's master) and
``slotfill status`` seeing queues whose slots live on different masters."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import key_slot
from typer.testing import CliRunner

from producer import AsyncClient, Client, JobStatus, RedisUnavailable
from producer.keys import QueueKeys
from slotfill.cli.main import app
from slotfill.testing.cluster import LocalCluster
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until

QUEUES = ("qa", "qb")  # slots 2031 and 14220: the first and the last master


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3, replicas_per_master=1) as cl:
        yield cl


@pytest.fixture(scope="module")
def workers(cluster: LocalCluster) -> Iterator[list[InprocWorker]]:
    """One in-process worker per queue (no process has to die here)."""
    ws = [InprocWorker(cluster.url, f"w-{q}", queue=q, engine="sim", sim_step_ms=5,
                       max_num_seqs=8, headroom=4, lease_seconds=2,
                       heartbeat_seconds=0.5).start() for q in QUEUES]
    try:
        for w in ws:
            w.wait_ready(60)
        yield ws
    finally:
        for w in ws:
            w.stop(10)


def test_the_queues_live_on_different_masters(cluster: LocalCluster) -> None:
    a, b = (cluster.master_of_key(QueueKeys.for_queue(q).base) for q in QUEUES)
    assert a.port != b.port
    assert key_slot(QueueKeys.for_queue("qa").job("x").encode()) == key_slot(
        QueueKeys.for_queue("qa").stream().encode())


def test_submit_wait_stream_and_cancel(cluster: LocalCluster,
                                       workers: list[InprocWorker]) -> None:
    c = Client.from_url(cluster.url, queue="qa")
    try:
        ids = c.submit_many([{"prompt": f"p{i}", "max_tokens": 5} for i in range(30)])
        assert all(c.wait(i, timeout=20).status is JobStatus.succeeded for i in ids)
        job = c.submit("stream me", max_tokens=12, stream=True)
        events = list(c.stream(job.id, timeout=20))
        text = "".join(getattr(e, "text", "") for e in events[:-1])
        assert events[-1].status is JobStatus.succeeded  # type: ignore[union-attr]
        assert text == events[-1].text  # type: ignore[union-attr]
        long = c.submit("long", max_tokens=400)
        wait_until(lambda: c.status(long.id) is JobStatus.running, timeout=10, interval=0.01,
                   what="the long job to run")
        assert c.cancel(long.id) == "requested"
        assert c.wait(long.id, timeout=5).status is JobStatus.cancelled
        assert f"job {long.id} cancel requested (control channel)" in workers[0].log_text()
    finally:
        c.close()


def test_async_client(cluster: LocalCluster, workers: list[InprocWorker]) -> None:
    async def run() -> list[JobStatus]:
        async with AsyncClient.from_url(cluster.url, queue="qb") as c:
            ids = await c.submit_many([{"prompt": "y", "max_tokens": 3}] * 10)
            one = await c.submit("z", max_tokens=3)
            return [(await c.wait(i, timeout=20)).status for i in [*ids, one.id]]

    assert set(asyncio.run(run())) == {JobStatus.succeeded}


def test_status_sees_every_master(cluster: LocalCluster, workers: list[InprocWorker]) -> None:
    out = subprocess.run([sys.executable, "-m", "slotfill", "status", "--json",
                          "--redis-url", cluster.url], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    queues = data["queues"] if isinstance(data, dict) else data
    seen = {q["queue"]: q for q in queues}
    assert set(QUEUES) <= set(seen)
    assert all(len(seen[q]["workers"]) == 1 for q in QUEUES)


def test_batch_file_runs_on_a_cluster(cluster: LocalCluster, workers: list[InprocWorker],
                                      tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                       "url": "/v1/completions",
                                       "body": {"prompt": f"p{i}", "max_tokens": 3}}) + "\n"
                           for i in range(12)))
    args = ["batch", "submit", str(inp), "--out", str(out), "--queue", "qb",
            "--redis-url", cluster.url, "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"c{i}" for i in range(12))
    assert {x["response"]["status_code"] for x in lines} == {200}
    again = CliRunner().invoke(app, args)  # resumed: nothing submitted twice
    assert again.exit_code == 0, again.output
    assert len(out.read_text().splitlines()) == 12


def _on_replica(cluster: LocalCluster, queue: str, job_ids: list[str]) -> bool:
    """Whether the replica of the queue's master holds every one of the jobs' records."""
    keys = QueueKeys.for_queue(queue)
    replica = cluster.node_client(cluster.replica_of(cluster.master_of_key(keys.base)))
    replica.execute_command("READONLY")
    return all(replica.exists(keys.job(j)) for j in job_ids)


def test_replica_acks_wait_on_the_queues_master(cluster: LocalCluster) -> None:
    for q in QUEUES:  # on two different masters
        with Client.from_url(cluster.url, queue=q, replica_acks=1) as c:
            ids = [c.submit("acked", max_tokens=2).id,
                   *c.submit_many([{"prompt": "x", "max_tokens": 2}] * 5)]
            assert _on_replica(cluster, q, ids)
        with Client.from_url(cluster.url, queue=q, replica_acks=2,
                             replica_ack_timeout_ms=100) as c, pytest.raises(RedisUnavailable):
            c.submit("two replicas wanted, one exists", max_tokens=2)

    async def run() -> list[str]:
        async with AsyncClient.from_url(cluster.url, queue="qb", replica_acks=1) as c:
            one = await c.submit("acked async", max_tokens=2)
            return [one.id, *await c.submit_many([{"prompt": "y", "max_tokens": 2}] * 3)]

    assert _on_replica(cluster, "qb", asyncio.run(run()))


def test_the_worker_store_never_blocks_its_event_loop_on_a_cluster(
        cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py's asyncio cluster client runs every command queued on a MULTI pipeline in a
    new thread with its own event loop and joins it: the worker's loop stops meanwhile, and
    after a master was killed such a thread re-initialised the cluster with the stopped
    loop's connections and never returned (the frozen worker of the cluster kill test,
    located by its SIGUSR1 stack dump in the heartbeat). No store call may start a thread."""
    import threading

    from producer.connection import connect_async
    from worker.claim import ClaimedJob, Disposition
    from worker.store import WorkerStore

    started: list[str] = []
    real_start = threading.Thread.start

    def spy(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    async def run() -> list[int]:
        r = connect_async(cluster.url)
        store = WorkerStore(r, QUEUES[0], "no-threads")
        await store.ensure_groups()
        row = ClaimedJob(stream=store.keys.stream("normal"), entry="0-1", job_id="0" * 32,
                         body="{}", attempts=1, deliveries=1, disposition=Disposition.run,
                         queued_at=0.0)
        with monkeypatch.context() as m:
            m.setattr(threading.Thread, "start", spy)
            await store.heartbeat({"state": "test"}, 5)
            ids = await store.load_checkpoint(row)
        await r.aclose()
        return ids

    assert asyncio.run(run()) == []  # no checkpoint: start from scratch
    assert started == []
