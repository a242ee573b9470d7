"""The worker's writes are fenced by attempt and idempotent: a retried token-stream append or
result write (its reply was lost) changes nothing and is recognised as the writer's own; a
gap is refused; an attempt that lost the job publishes nothing."""

from __future__ import annotations

import json

import redis

from producer import Client
from producer.keys import GROUP, QueueKeys
from producer.scripts import source
from slotfill.testing import signals as watch
from slotfill.testing.stream_check import check_job, read_stream


def _running(r: redis.Redis, client: Client, queue: str, attempts: int = 1,
             stream: bool = True) -> tuple[QueueKeys, str, str]:
    """A submitted job read by a worker (``start_jobs`` is what puts it in the PEL)."""
    keys = QueueKeys.for_queue(queue)
    job = client.submit("x", stream=stream)
    for s in keys.streams:
        r.xgroup_create(s, GROUP, id="0", mkstream=True)
    r.xreadgroup(GROUP, "w", {keys.stream(): ">"})
    r.hset(keys.job(job.id), mapping={"status": "running", "attempts": attempts, "worker": "w"})
    return keys, job.id, r.hget(keys.job(job.id), "entry").decode()


def _append(r: redis.Redis, keys: QueueKeys, job_id: str, attempt: int, text: str,
            ids: list[int], offset: int, seq: int) -> int:
    script = r.register_script(source("append_tokens"))
    return int(script(keys=[keys.job(job_id), keys.tokens(job_id), keys.checkpoint(job_id)],
                      args=[attempt, 1000, 60, "w", text, json.dumps(ids) if ids else "",
                            offset, len(ids), seq, 1, "", "", 60]))


def test_a_retried_append_writes_nothing_and_a_gap_is_refused(
        r: redis.Redis, client: Client, queue: str) -> None:
    keys, job_id, _ = _running(r, client, queue)
    assert _append(r, keys, job_id, 1, "ab", [1, 2], 0, 1) == 1
    assert _append(r, keys, job_id, 1, "ab", [1, 2], 0, 1) == 1  # the reply was lost
    assert _append(r, keys, job_id, 1, "c", [3], 2, 2) == 1
    assert _append(r, keys, job_id, 1, "e", [5], 4, 4) == -1    # delta 3 never arrived
    assert _append(r, keys, job_id, 1, "d", [4], 5, 3) == -1    # wrong offset
    assert _append(r, keys, job_id, 2, "z", [9], 3, 3) == 0     # not the job's attempt
    v = read_stream(r, keys.tokens(job_id))
    assert (v.attempt, v.text, v.ids, v.problems) == ("1", "abc", [1, 2, 3], [])
    assert r.xlen(keys.tokens(job_id)) == 3  # start + two deltas


def test_text_without_tokens_is_not_written_twice(r: redis.Redis, client: Client,
                                                  queue: str) -> None:
    keys, job_id, _ = _running(r, client, queue)
    assert _append(r, keys, job_id, 1, "a", [1], 0, 1) == 1
    assert _append(r, keys, job_id, 1, "!", [], 1, 2) == 1
    assert _append(r, keys, job_id, 1, "!", [], 1, 2) == 1
    assert read_stream(r, keys.tokens(job_id)).text == "a!"


def _finish(r: redis.Redis, keys: QueueKeys, job_id: str, entry: str, attempt: int,
            text: str) -> int:
    script = r.register_script(source("finish_job"))
    result = json.dumps({"id": job_id, "status": "succeeded", "text": text,
                         "attempts": attempt, "usage": {"completion_tokens": len(text)}})
    return int(script(keys=[keys.stream(), keys.job(job_id), keys.done(job_id), keys.stats,
                            keys.dead_letter, keys.tokens(job_id), keys.callbacks],
                      args=[entry, GROUP, "succeeded", result, 1.0, 60, "", "", 1, attempt,
                            "", 0]))


def _stat(r: redis.Redis, keys: QueueKeys, name: str) -> int:
    return int(r.hget(keys.stats, name) or 0)


def test_a_retried_result_write_is_the_writers_own(r: redis.Redis, client: Client,
                                                   queue: str) -> None:
    keys, job_id, entry = _running(r, client, queue)
    watch.watch(r, keys, "t-watch", [job_id])
    assert _append(r, keys, job_id, 1, "ab", [1, 2], 0, 1) == 1
    assert _finish(r, keys, job_id, entry, 1, "ab") == 1
    assert _finish(r, keys, job_id, entry, 1, "ab") == 1  # the reply was lost: still ours
    assert _stat(r, keys, "duplicates_suppressed") == 0
    assert _finish(r, keys, job_id, entry, 2, "other") == 0  # a real duplicate
    assert _stat(r, keys, "duplicates_suppressed") == 1
    assert watch.pushes(r, keys, "t-watch")[job_id] == 1  # published once
    assert r.llen(keys.done(job_id)) == 0 and check_job(r, keys, job_id, True) == []


def test_an_attempt_that_lost_the_job_publishes_nothing(r: redis.Redis, client: Client,
                                                        queue: str) -> None:
    keys, job_id, entry = _running(r, client, queue)
    assert _append(r, keys, job_id, 1, "old", [7, 7, 7], 0, 1) == 1
    r.hset(keys.job(job_id), "attempts", 2)  # a peer reclaimed it
    r.xclaim(keys.stream(), GROUP, "peer", 0, [entry])
    assert _finish(r, keys, job_id, entry, 1, "old") == 0
    assert r.hget(keys.job(job_id), "status") == b"running"
    assert r.xpending(keys.stream(), GROUP)["pending"] == 1  # still the peer's to finish
    assert _append(r, keys, job_id, 2, "new", [8], 0, 1) == 1
    assert _finish(r, keys, job_id, entry, 2, "new") == 1
    assert check_job(r, keys, job_id, True) == []
    assert read_stream(r, keys.tokens(job_id)).text == "new"


def test_an_attempt_without_output_still_names_itself_in_the_stream(
        r: redis.Redis, client: Client, queue: str) -> None:
    """Attempt 1 streamed, attempt 2 ended before any output (e.g. its deadline passed):
    the stream must not end with attempt 1's text under attempt 2's result."""
    keys, job_id, entry = _running(r, client, queue)
    assert _append(r, keys, job_id, 1, "old", [7], 0, 1) == 1
    r.hset(keys.job(job_id), "attempts", 2)
    assert _finish(r, keys, job_id, entry, 2, "") == 1
    v = read_stream(r, keys.tokens(job_id))
    assert (v.attempt, v.text, v.ended) == ("2", "", True)
    assert check_job(r, keys, job_id, True) == []


def test_dropped_entries_never_let_a_lower_stream_go_first(r: redis.Redis, client: Client,
                                                           queue: str) -> None:
    """Issue 12: two plain XADD entries carrying a finished job's id on the normal stream let
    low jobs start before the normal one behind them."""
    keys, done_id, entry = _running(r, client, queue)
    assert _finish(r, keys, done_id, entry, 1, "") == 1
    for _ in range(2):
        r.xadd(keys.stream("normal"), {"id": done_id, "body": '{"prompt": "again"}'})
    normal = client.submit("n").id
    client.submit_many([{"prompt": "l", "priority": "low"}] * 2)
    start = r.register_script(source("start_jobs"))
    rows = start(keys=keys.streams, args=[GROUP, "w2", 1, 1.0, keys.base])
    jobs = [dict(zip(row[::2], row[1::2], strict=True))[b"job"].decode() for row in rows]
    assert jobs == [normal]
    assert int(r.hget(keys.stats, "duplicate_entries") or 0) == 2
