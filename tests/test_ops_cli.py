"""``slotfill status`` and ``slotfill dlq`` against a real Redis and a simulated-engine worker
(in-process).

Dead letters are made the real way: a job delivered more often than ``max_deliveries``
(a ghost consumer takes it and goes silent; the worker reclaims it on its second delivery)
and a stream entry that is not a job."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from producer import Client, JobStatus, QueueKeys
from producer.keys import GROUP
from producer.queue_stats import QueueSnapshot, snapshot
from slotfill.cli.main import app
from slotfill.cli.status import DeadLetters
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

runner = CliRunner()


def cli(url: str, *args: str) -> tuple[int, str]:
    res = runner.invoke(app, [*args, "--redis-url", url], env={"COLUMNS": "160"})
    return res.exit_code, res.output


@pytest.fixture
def worker(redis_server: RedisServer, queue: str) -> Iterator[InprocWorker]:
    with InprocWorker(redis_server.url, f"ops-{queue}", queue=queue, engine="sim",
                      sim_step_ms=3, max_num_seqs=8, headroom=4, lease_seconds=0.3,
                      max_deliveries=1, heartbeat_seconds=0.2) as w:
        yield w


def test_status_shows_workers_and_queue(redis_server: RedisServer, client: Client, queue: str,
                                        worker: InprocWorker) -> None:
    ids = client.submit_many([{"prompt": "x", "max_tokens": 20 + i % 40} for i in range(150)])
    beat = QueueKeys.for_queue(queue).worker(worker.consumer)
    # Heartbeats with work in flight and output already counted.
    wait_until(lambda: int(client.redis.hget(beat, "output_tokens") or 0) > 0,
               what="a heartbeat that counts output tokens")
    code, out = cli(redis_server.url, "status", "--queue", queue, "--json")
    assert code == 0, out
    [q] = json.loads(out)
    assert q["queue"] == queue and q["depth"] > 0 and q["lag"] > 0
    assert q["running"] > 0 and q["oldest_waiting_s"] > 0
    [w] = q["workers"]
    assert w["name"] == worker.consumer and int(w["in_flight"]) > 0
    # The heartbeat's engine figures are its last step's: a step between two waves of
    # finishing jobs can show fewer than all slots running.
    assert 0 < int(w["running"]) <= 8 and int(w["slots"]) == 8
    assert int(w["output_tokens"]) > 0 and float(w["output_tokens_per_s"]) >= 0
    code, out = cli(redis_server.url, "status", "--queue", queue)
    assert code == 0, out
    assert worker.consumer in out and "pulling" in out and queue in out
    code, out = cli(redis_server.url, "status", "--queue", queue, "--watch", "--interval", "0.05",
                    "--count", "3")
    assert code == 0, out
    for i in ids:
        client.wait(i, timeout=60)
    # Without --queue it finds every queue in this Redis.
    code, out = cli(redis_server.url, "status", "--json")
    assert code == 0 and queue in [x["queue"] for x in json.loads(out)]


def _poison(r: redis.Redis, client: Client, queue: str) -> str:
    """A job delivered again and again to a consumer that dies silently: past the backstop
    (3 x max_deliveries=1 deliveries) the worker's reclaim dead-letters it."""
    keys = QueueKeys.for_queue(queue)
    for stream in keys.streams:
        try:
            r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError:
            pass
    job = client.submit(prompt="poison me", max_tokens=3)
    got = r.xreadgroup(GROUP, "ghost", {keys.stream("normal"): ">"}, count=1)
    entry = got[0][1][0][0]
    for _ in range(3):  # each XCLAIM without JUSTID counts one more delivery
        r.xclaim(keys.stream("normal"), GROUP, "ghost", 0, [entry])
    return job.id


def test_dlq_list_show_replay(redis_server: RedisServer, r: redis.Redis, client: Client,
                              queue: str, tmp_path: Path) -> None:
    keys = QueueKeys.for_queue(queue)
    job_id = _poison(r, client, queue)
    w = InprocWorker(redis_server.url, f"dlq-{queue}", queue=queue, engine="sim",
                     sim_step_ms=3, lease_seconds=0.3, max_deliveries=1).start()
    try:
        w.wait_ready(60)
        res = client.wait(job_id, timeout=30)
        assert res.status is JobStatus.failed and res.error and res.error.code == "poisoned"
        r.xadd(keys.stream("normal"), {"body": "not a job"})  # malformed: no id
        wait_until(lambda: r.xlen(keys.dead_letter) >= 2, what="both dead letters")

        code, out = cli(redis_server.url, "dlq", "list", "--queue", queue)
        assert code == 0, out
        assert job_id in out and "poisoned" in out and "malformed" in out

        code, out = cli(redis_server.url, "dlq", "show", job_id, "--queue", queue)
        assert code == 0, out
        shown = json.loads(out)
        assert shown["job"] == job_id and shown["reason"] == "poisoned"
        assert shown["body"]["prompt"] == "poison me"
        assert shown["job_record"]["status"] == "failed"

        code, out = cli(redis_server.url, "dlq", "replay", job_id, "--queue", queue)
        assert code == 0, out
        assert "1 replayed" in out
        again = client.wait(job_id, timeout=30)  # the same job id, now run for real
        assert again.status is JobStatus.succeeded and again.usage.completion_tokens == 3
        assert r.hget(keys.job(job_id), "replayed_from") is not None

        code, out = cli(redis_server.url, "dlq", "replay", job_id, "--queue", queue)
        assert code == 1 and "missing" in out  # no longer dead-lettered

        # The malformed entry is refused: as a job it could only fail again (undecodable).
        code, out = cli(redis_server.url, "dlq", "replay", "--all", "--queue", queue)
        assert code == 1 and "invalid" in out and "not a job request" in out, out
        assert "0 replayed, 1 not" in out
        assert r.xlen(keys.dead_letter) == 1
        assert int(r.hget(keys.stats, "dead_replayed") or 0) == 1
    finally:
        w.stop()


BODY = json.dumps({"prompt": "x"})


def test_replay_refuses_active_jobs_and_full_queues(r: redis.Redis, redis_server: RedisServer,
                                                    queue: str) -> None:
    keys = QueueKeys.for_queue(queue)
    c = Client.from_url(redis_server.url, queue=queue)
    c.configure_queue(max_pending=1)
    queued = c.submit(prompt="still queued")
    stream = keys.stream("normal")
    dead = r.xadd(keys.dead_letter, {"stream": stream, "entry": "1-1", "reason": "poisoned",
                                     "deliveries": 4, "job": queued.id, "body": BODY,
                                     "at": time.time()}).decode()
    dl = DeadLetters(r, queue)
    letter = dl.get(dead)
    assert letter is not None
    assert dl.replay(letter).outcome == "active"  # never two entries for one job
    other = r.xadd(keys.dead_letter, {"stream": stream, "entry": "1-2", "reason": "poisoned",
                                      "deliveries": 4, "job": "f" * 32, "body": BODY,
                                      "at": time.time()}).decode()
    letter = dl.get(other)
    assert letter is not None
    rep = dl.replay(letter)
    assert rep.outcome == "full"  # the cap holds for replays too
    assert r.xlen(keys.dead_letter) == 2 and r.xlen(stream) == 1
    c.close()


def test_snapshot_counts_lag_pending_and_age(r: redis.Redis, client: Client, queue: str) -> None:
    keys = QueueKeys.for_queue(queue)
    client.submit_many([{"prompt": "x"} for _ in range(5)])
    client.submit(prompt="urgent", priority="high")
    r.xgroup_create(keys.stream("normal"), GROUP, id="0", mkstream=True)
    r.xreadgroup(GROUP, "someone", {keys.stream("normal"): ">"}, count=2)

    def aged() -> QueueSnapshot | None:
        snap = snapshot(r, queue)
        return snap if snap.oldest_waiting_age > 0.04 else None

    s = wait_until(aged, what="the oldest waiting job to age past 40 ms")
    normal = next(x for x in s.streams if x.priority == "normal")
    high = next(x for x in s.streams if x.priority == "high")
    assert (normal.depth, normal.pending, normal.lag) == (5, 2, 3)
    assert (high.depth, high.pending, high.lag) == (1, 0, 1)  # no group yet: all waiting
    assert s.depth == 6 and s.lag == 4 and 0.04 < s.oldest_waiting_age < 10
