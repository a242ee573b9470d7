"""Client -> Redis -> worker -> real vLLM engine (CPU build, tiny model) -> reply keys."""

from __future__ import annotations

import json
import random

import pytest
import redis

from producer import Client, JobStatus, QueueKeys
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from tests.conftest import ENGINE_HEADROOM, ENGINE_SLOTS, step_log_path

pytestmark = pytest.mark.engine


def test_jobs_of_varied_lengths_get_exact_results(engine_client: Client) -> None:
    rng = random.Random(1)
    reqs = []
    for i in range(120):
        words = " ".join(rng.choice(["queue", "slot", "engine", "redis"])
                         for _ in range(rng.randint(1, 60)))
        req = {"max_tokens": rng.randint(1, 96), "ignore_eos": True, "temperature": 0.7,
               "seed": i}
        if i % 7 == 0:
            req["messages"] = [{"role": "user", "content": words}]
        else:
            req["prompt"] = words
        reqs.append(req)
    ids = engine_client.submit_many(reqs)
    for job_id, req in zip(ids, reqs, strict=True):
        res = engine_client.wait(job_id, timeout=180)
        assert res.status is JobStatus.succeeded, res
        assert res.usage.completion_tokens == req["max_tokens"]
        assert res.usage.prompt_tokens > 0
        assert res.finish_reason == "length"
        assert res.text
        t = res.timings
        assert t.queued_at and t.started_at and t.finished_at
        assert t.queued_at <= t.started_at <= t.finished_at
        if t.first_token_at is not None:
            assert t.started_at - 1 <= t.first_token_at <= t.finished_at
        assert engine_client.status(job_id) is JobStatus.succeeded


def test_backlog_keeps_the_real_engine_busy(engine_client: Client,
                                            engine_worker: WorkerProcess) -> None:
    """With jobs waiting in Redis, the feeder refills the real engine's slots: read from
    vLLM's own scheduler stats (stat logger), no step had a free slot, nothing queued inside
    the engine, and a feeder that was neither at capacity nor already reading from Redis;
    the engine never held more than the admission rule allows.

    How full the engine ran overall is reported, not asserted: on a 2-core box the CPU engine
    busy-polls both cores and Redis / the worker go unscheduled for up to ~0.5 s (measured),
    which drains the batch while the read is on its way. The feeder's own logic is checked
    against a strict bound on the simulated engine in test_refill.py."""
    rng = random.Random(2)
    ids = engine_client.submit_many(
        [{"prompt": "refill " * rng.randint(1, 30), "max_tokens": rng.randint(32, 96),
          "ignore_eos": True} for _ in range(150)])
    results = [engine_client.wait(i, timeout=300) for i in ids]
    assert all(res.status is JobStatus.succeeded for res in results)
    first = min(res.timings.started_at or 0 for res in results) + 0.2
    last = max(res.timings.started_at or 0 for res in results)
    steps = [json.loads(line) for line in step_log_path(engine_worker).read_text().splitlines()]
    window = [s for s in steps if first <= s["t"] <= last and s["backlog"]]
    assert len(window) > 50
    capacity = ENGINE_SLOTS + ENGINE_HEADROOM
    forgot = [s for s in window if s["running"] < ENGINE_SLOTS and s["waiting"] == 0
              and s["held"] < capacity and not s["reading"]]
    # A step can land between a slot freeing and the pull loop's next read (one event-loop
    # turn); more than a few such steps would mean the feeder is not event-driven. 5 %: with
    # the CPU engine busy on both cores of a shared box the worker's loop goes unscheduled
    # for stretches in which the engine steps on (155 of 4,112 steps, 3.8 %, in one CI run
    # on 2026-12-01; 2 % held on quiet boxes); a feeder that waited for a timer instead of
    # the finish would leave most steps of a refill window short.
    assert len(forgot) <= max(3, 0.05 * len(window)), (len(forgot), len(window))
    fed = sum(1 for s in window if s["running"] >= ENGINE_SLOTS or s["waiting"] > 0)
    print(f"engine fed on {fed}/{len(window)} backlog steps ({100 * fed / len(window):.0f} %)")
    # The default (adaptive) rule holds at least ``capacity`` and, when finishes come faster
    # than a refill, at most one more batch (worker/admission.py).
    assert max(s["running"] + s["waiting"] for s in steps) <= ENGINE_SLOTS + max(
        ENGINE_HEADROOM, ENGINE_SLOTS)


BAD_VIA_RAW_XADD = {
    "not json": {"id": "a" * 32, "body": "{not json"},
    "wrong encoding": {"id": "b" * 32, "body": b"\xff\xfe\x00garbage"},
    "missing body": {"id": "c" * 32},
    "wrong types": {"id": "d" * 32, "body": json.dumps({"prompt": 5, "max_tokens": "x"})},
    "unknown field": {"id": "e" * 32, "body": json.dumps({"prompt": "a", "bogus": 1})},
    "prompt too long": {"id": "f" * 32, "body": json.dumps({"prompt": "queue " * 2000})},
    "max_tokens past context": {"id": "1" * 32,
                                "body": json.dumps({"prompt": "a", "max_tokens": 100000})},
    "NaN temperature": {"id": "2" * 32, "body": '{"prompt": "a", "temperature": NaN}'},
    "token id out of vocab": {"id": "3" * 32, "body": json.dumps({"prompt": [10**7]})},
}


def test_bad_entries_fail_alone(engine_client: Client, r: redis.Redis) -> None:
    keys = QueueKeys.for_queue("e2e")

    def malformed() -> int:  # the e2e queue's dead letters are shared by the session's tests
        return sum(e[1][b"reason"].startswith(b"malformed") for e in r.xrange(keys.dead_letter))

    malformed_before = malformed()
    good_before = engine_client.submit(prompt="fine", max_tokens=5, ignore_eos=True)
    for fields in BAD_VIA_RAW_XADD.values():
        r.xadd(keys.stream("normal"), fields)
    r.xadd(keys.stream("normal"), {"garbage": "no id at all"})
    good_after = engine_client.submit(prompt="still fine", max_tokens=5, ignore_eos=True)
    for name, fields in BAD_VIA_RAW_XADD.items():
        job_id = str(fields["id"])
        # Raw XADD writes no job record: wait on the done list as PROTOCOL.md says.
        assert r.blmove(keys.done(job_id), keys.done(job_id), 30, "LEFT", "LEFT"), name
        res = engine_client.wait(job_id, timeout=30)
        assert res.status is JobStatus.failed, name
        assert res.error is not None and res.error.code in (
            "undecodable", "invalid_request", "prompt_too_long"), (name, res.error)
        assert res.error.message
    assert engine_client.result(str(BAD_VIA_RAW_XADD["prompt too long"]["id"])).error.code == (  # type: ignore[union-attr]
        "prompt_too_long")
    for job in (good_before, good_after):
        res = engine_client.wait(job.id, timeout=60)
        assert res.status is JobStatus.succeeded and res.usage.completion_tokens == 5
    # The entry without an id has no result to wait on: its dead letter is written when the
    # worker gets to it, which may be after the jobs above finished (seen failing on a GPU).
    wait_until(lambda: malformed() > malformed_before, timeout=30,
               what="the malformed entry's dead letter")
    wait_until(lambda: r.xlen(keys.stream("normal")) == 0, timeout=30,
               what="every entry acked and removed")


def test_too_long_prompt_from_the_client_fails_with_a_typed_error(engine_client: Client) -> None:
    job = engine_client.submit(prompt="redis " * 3000, max_tokens=4)
    res = engine_client.wait(job.id, timeout=30)
    assert res.status is JobStatus.failed and res.error and res.error.code == "prompt_too_long"
