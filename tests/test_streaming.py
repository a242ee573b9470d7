"""Token streaming through per-job reply streams, on in-process workers (simulated engine):
resume after a disconnect, several readers, cancellation, deadlines, a worker process killed
mid-stream, and the fence that keeps a stale attempt from writing."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import redis

from producer import (
    AsyncClient,
    Client,
    JobResult,
    JobStatus,
    Moved,
    QueueKeys,
    Restarted,
    TokenDelta,
)
from producer.scripts import source
from producer.streaming import StreamEvent
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer
from tests.test_lifecycle import inproc_worker, job_field, sim_worker, workers


def collect(events: list[StreamEvent]) -> tuple[str, JobResult]:
    """The text a reader shows (dropped at each restart) and the final result."""
    text = ""
    for e in events[:-1]:
        if isinstance(e, Restarted):
            text = ""
        elif isinstance(e, TokenDelta):
            text += e.text
    assert isinstance(events[-1], JobResult)
    return text, events[-1]


def test_deltas_add_up_to_the_result_and_are_coalesced(
        redis_server: RedisServer, r: redis.Redis, client: Client, queue: str) -> None:
    with workers(inproc_worker(redis_server.url, queue, "s1", stream_interval_ms=30)):
        job = client.submit("hello", max_tokens=60, stream=True)
        events = list(client.stream(job.id, timeout=30))
    text, res = collect(events)
    assert res.status is JobStatus.succeeded
    assert text == res.text and res.usage.completion_tokens == 60
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    # 60 tokens at 10 ms per step over 30 ms windows: several deltas, far fewer than tokens.
    assert 3 <= len(deltas) < 40, len(deltas)
    assert [d.offset for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i])
                                          for i in range(len(deltas))]
    key = QueueKeys.for_queue(queue).tokens(job.id)
    assert 0 < r.ttl(key) <= client.settings.result_ttl
    kinds = [f[b"type"] for _id, f in r.xrange(key)]
    assert kinds[0] == b"start" and kinds[-1] == b"end" and kinds.count(b"start") == 1


def test_the_first_delta_does_not_wait_for_the_coalescing_interval(
        redis_server: RedisServer, r: redis.Redis, client: Client, queue: str) -> None:
    """With a 60 s interval, later output waits for the job's end (its drain), but the
    first token is written as soon as the engine makes it: time to first token."""
    with workers(inproc_worker(redis_server.url, queue, "s1", stream_interval_ms=60_000)):
        job = client.submit("hello", max_tokens=300, stream=True)
        events = list(client.stream(job.id, timeout=60))
    text, res = collect(events)
    assert res.status is JobStatus.succeeded and text == res.text
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert len(deltas) >= 2, [len(d.token_ids) for d in deltas]
    # One step makes one token; a loaded loop may let a few more steps pass first.
    assert len(deltas[0].token_ids) < 100, [len(d.token_ids) for d in deltas]


def test_a_reader_resumes_where_it_left_off_and_a_second_reader_follows_too(
        redis_server: RedisServer, r: redis.Redis, client: Client, queue: str) -> None:
    with workers(inproc_worker(redis_server.url, queue, "s1", stream_interval_ms=20)):
        job = client.submit("hello", max_tokens=150, stream=True)
        second: list[StreamEvent] = []
        follower = threading.Thread(target=lambda: second.extend(client.stream(job.id, timeout=30)))
        follower.start()
        first_part: list[StreamEvent] = []
        for event in client.stream(job.id, timeout=30):
            first_part.append(event)
            if sum(isinstance(e, TokenDelta) for e in first_part) == 2:
                break  # the client "disconnects" here
        # Output keeps coming while the reader is away.
        tokens = QueueKeys.for_queue(queue).tokens(job.id)
        wait_until(lambda: r.xlen(tokens) >= len(first_part) + 3,
                   what="more output while the reader is away")
        last = first_part[-1]
        assert isinstance(last, TokenDelta)
        rest = list(client.stream(job.id, after=last.entry_id, timeout=30))
        follower.join(30)
    text, res = collect(first_part + rest)
    assert text == res.text and res.usage.completion_tokens == 150
    ids = [e.entry_id for e in first_part + rest if isinstance(e, TokenDelta)]
    assert len(ids) == len(set(ids)), "an entry was yielded twice"
    assert collect(second)[0] == res.text


def test_cancel_and_deadline_end_the_stream_with_their_status(
        redis_server: RedisServer, client: Client, queue: str) -> None:
    with workers(inproc_worker(redis_server.url, queue, "s1", stream_interval_ms=20)):
        cancelled = client.submit("hello", max_tokens=400, stream=True)
        expiring = client.submit("hello", max_tokens=400, stream=True, timeout=1.0)
        seen: list[StreamEvent] = []
        for event in client.stream(cancelled.id, timeout=30):
            seen.append(event)
            if isinstance(event, TokenDelta) and len(seen) == 3:
                assert client.cancel(cancelled.id) == "requested"
        text, res = collect(seen)
        assert res.status is JobStatus.cancelled and text == res.text and text
        text, res = collect(list(client.stream(expiring.id, timeout=30)))
        assert res.status is JobStatus.expired and text == res.text
        assert 0 < res.usage.completion_tokens < 400


def test_a_queued_streaming_job_cancelled_before_it_runs_ends_its_stream(
        client: Client) -> None:
    job = client.submit("nobody pulls this queue", stream=True)
    assert client.cancel(job.id) == "cancelled"
    events = list(client.stream(job.id, timeout=5))
    assert len(events) == 1 and isinstance(events[0], JobResult)
    assert events[0].status is JobStatus.cancelled


def test_a_job_that_did_not_ask_to_stream_yields_its_whole_text(
        redis_server: RedisServer, client: Client, queue: str) -> None:
    with workers(inproc_worker(redis_server.url, queue, "s1")):
        job = client.submit("hello", max_tokens=5)
        events = list(client.stream(job.id, timeout=30))
    assert [type(e) for e in events] == [TokenDelta, JobResult]
    assert collect(events)[0] == events[-1].text != ""  # type: ignore[union-attr]


def _kill_mid_stream(redis_server: RedisServer, client: Client, queue: str, tmp_path: Path,
                     **b_settings: float) -> tuple[list[StreamEvent], str]:
    """A streaming job whose worker is killed after 3 deltas; worker b finishes it. The
    reader's events (it resumed after its last one), and the job id."""
    a = sim_worker(redis_server.url, queue, tmp_path, "a", stream_interval_ms=20)
    with workers(a):
        job = client.submit("hello", max_tokens=300, stream=True)
        events: list[StreamEvent] = []
        it = client.stream(job.id, timeout=60)
        for event in it:
            events.append(event)
            if sum(isinstance(e, TokenDelta) for e in events) == 3:
                break
        a.kill()
        with workers(inproc_worker(redis_server.url, queue, "b", stream_interval_ms=20,
                                   **b_settings)):
            events += list(client.stream(job.id, after=events[-1].entry_id,  # type: ignore[union-attr]
                                         timeout=60))
    return events, job.id


@pytest.mark.fault
def test_worker_killed_mid_stream_reader_is_told_and_sees_only_the_new_attempt(
        redis_server: RedisServer, r: redis.Redis, client: Client, queue: str,
        tmp_path: Path) -> None:
    """Without checkpoints (b has them off) the job starts over."""
    events, job_id = _kill_mid_stream(redis_server, client, queue, tmp_path,
                                      checkpoint_interval_ms=0)
    restarts = [e for e in events if isinstance(e, Restarted)]
    assert len(restarts) == 1 and restarts[0].attempt == 2 and restarts[0].worker == "b"
    text, res = collect(events)
    assert res.status is JobStatus.succeeded and res.attempts == 2
    assert text == res.text and res.usage.completion_tokens == 300
    after = [e for e in events[events.index(restarts[0]):] if isinstance(e, TokenDelta)]
    assert after[0].offset == 0 and all(d.attempt == 2 for d in after)
    # A reader that starts now sees one attempt only: the first one's entries were dropped.
    fresh = list(client.stream(job_id, timeout=5))
    assert not any(isinstance(e, Restarted) for e in fresh) and collect(fresh)[0] == res.text
    assert job_field(r, queue, job_id, "stream_attempt") == "2"
    assert res.restarted and res.resumed_at_token is None


@pytest.mark.fault
def test_worker_killed_mid_stream_the_job_moves_and_the_reader_sees_only_new_text(
        redis_server: RedisServer, r: redis.Redis, client: Client, queue: str,
        tmp_path: Path) -> None:
    events, job_id = _kill_mid_stream(redis_server, client, queue, tmp_path)
    assert not any(isinstance(e, Restarted) for e in events)
    moves = [e for e in events if isinstance(e, Moved)]
    assert len(moves) == 1 and moves[0].attempt == 2 and moves[0].worker == "b"
    text, res = collect(events)
    assert res.status is JobStatus.succeeded and res.attempts == 2
    assert text == res.text and res.usage.completion_tokens == 300
    assert res.resumed_at_token == moves[0].at > 0 and res.restarted is None
    before = [e for e in events[:events.index(moves[0])] if isinstance(e, TokenDelta)]
    after = [e for e in events[events.index(moves[0]):] if isinstance(e, TokenDelta)]
    assert after[0].offset == moves[0].at and all(d.attempt == 2 for d in after)
    ids = [t for d in before + after for t in d.token_ids]
    assert len(ids) == 300 and ids == (res.token_ids or ids)
    # A reader that starts now sees the whole text once: both attempts' entries stay.
    fresh = list(client.stream(job_id, timeout=5))
    assert not any(isinstance(e, Restarted) for e in fresh) and collect(fresh)[0] == res.text


def test_a_stale_attempt_cannot_write(fake_r: redis.Redis, fake_client: Client,
                                     queue: str) -> None:
    r, client = fake_r, fake_client  # the fence is one script: fakeredis runs it
    job = client.submit("x", stream=True)
    keys = QueueKeys.for_queue(queue)
    r.hset(keys.job(job.id), mapping={"status": "running", "attempts": 2})
    append = r.register_script(source("append_tokens"))

    def write(attempt: int, text: str) -> int:
        return int(append(keys=[keys.job(job.id), keys.tokens(job.id),
                                keys.checkpoint(job.id)],
                          args=[attempt, 100, 60, "w", text, "", 0, 0, 1, 1, "", "", 60]))

    assert write(1, "old") == 0
    assert write(2, "new") == 1
    assert r.hset(keys.job(job.id), "status", "succeeded") == 0
    assert write(2, "after the end") == 0
    texts = [f.get(b"text") for _id, f in r.xrange(keys.tokens(job.id))]
    assert texts == [None, b"new"]


def test_async_client_streams(redis_server: RedisServer, queue: str) -> None:
    async def main() -> list[StreamEvent]:
        async with AsyncClient.from_url(redis_server.url, queue=queue) as c:
            job = await c.submit("hello", max_tokens=40, stream=True)
            return [e async for e in c.stream(job.id, timeout=30)]

    with workers(inproc_worker(redis_server.url, queue, "s1", stream_interval_ms=20)):
        events = asyncio.run(main())
    text, res = collect(events)
    assert text == res.text and res.usage.completion_tokens == 40
    assert sum(isinstance(e, TokenDelta) for e in events) >= 2

