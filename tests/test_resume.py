"""A worker killed (SIGKILL, a real process on the simulated engine) part-way through long
generations: the jobs continue on a peer from their checkpoints. The result has exactly
``max_tokens`` tokens and the uninterrupted text, a stream reader sees it go on without a
repeat or a gap, and the survivor's engine generated only the remainder (its step log)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis

from producer import Client, JobResult, JobStatus, Moved, Restarted
from producer.streaming import StreamEvent
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from tests.test_lifecycle import job_field, sim_worker, workers
from tests.test_streaming import collect

pytestmark = pytest.mark.fault

MAX_TOKENS = 600
CKPT = dict(checkpoint_interval_ms=100, stream_interval_ms=20, max_model_len=2048)


def _engine_tokens(step_log: Path) -> int:
    """Tokens the worker's engine generated, from its step log."""
    return sum(json.loads(line)["tokens"] for line in step_log.read_text().splitlines())


def _uninterrupted(n: int) -> str:
    # The sim engine's i-th token is i % 997 (worker/engines/sim.py), whichever worker runs it.
    return " ".join(f"t{i % 997}" for i in range(1, n + 1))


def _checkpointed(r: redis.Redis, queue: str, job_id: str, attempt: int) -> int:
    if job_field(r, queue, job_id, "ckpt_attempt") != str(attempt):
        return 0
    return int(job_field(r, queue, job_id, "ckpt_tokens") or 0)


def _follow(client: Client, job_id: str) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    t = threading.Thread(target=lambda: events.extend(client.stream(job_id, timeout=120)),
                         daemon=True)
    t.start()
    return events


def _kill_when_checkpointed(r: redis.Redis, queue: str, w: WorkerProcess, ids: list[str],
                            attempt: int, share: float) -> None:
    wait_until(lambda: all(_checkpointed(r, queue, j, attempt) >= share * MAX_TOKENS
                           for j in ids), timeout=60,
               what=f"checkpoints of attempt {attempt} past {share:.0%}")
    w.kill()


def test_a_killed_workers_jobs_continue_on_a_peer_from_their_checkpoints(
        redis_server: object, r: redis.Redis, client: Client, queue: str,
        tmp_path: Path) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    a = sim_worker(url, queue, tmp_path, "a", **CKPT)
    with workers(a):
        jobs = [client.submit("hello world", max_tokens=MAX_TOKENS, ignore_eos=True,
                              stream=stream) for stream in (True, True, False)]
        ids = [j.id for j in jobs]
        streams = {j.id: _follow(client, j.id) for j in jobs[:2]}
        _kill_when_checkpointed(r, queue, a, ids, 1, 0.5)
    b_log = tmp_path / "b.steps"
    with workers(sim_worker(url, queue, tmp_path, "b", step_log=str(b_log), **CKPT)):
        results = [client.wait(j, timeout=60) for j in ids]
        wait_until(lambda: all(ev and isinstance(ev[-1], JobResult)
                               for ev in streams.values()), timeout=30, what="stream readers")
    resumed = 0
    for res in results:
        assert res.status is JobStatus.succeeded and res.attempts == 2, res
        assert res.usage.completion_tokens == MAX_TOKENS and res.usage.prompt_tokens == 2
        assert res.text == _uninterrupted(MAX_TOKENS)
        assert res.resumed_at_token is not None and res.resumed_at_token >= MAX_TOKENS // 2
        resumed += res.resumed_at_token
    for job_id, events in streams.items():
        text, res = collect(events)
        assert text == res.text and not any(isinstance(e, Restarted) for e in events)
        moves = [e for e in events if isinstance(e, Moved)]
        assert [m.at for m in moves] == [res.resumed_at_token], job_id
    assert _engine_tokens(b_log) == len(ids) * MAX_TOKENS - resumed


def test_a_second_kill_during_the_resumed_attempt_resumes_again(
        redis_server: object, r: redis.Redis, client: Client, queue: str,
        tmp_path: Path) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    a = sim_worker(url, queue, tmp_path, "a", **CKPT)
    with workers(a):
        job = client.submit("hello world", max_tokens=MAX_TOKENS, ignore_eos=True, stream=True)
        events = _follow(client, job.id)
        _kill_when_checkpointed(r, queue, a, [job.id], 1, 0.4)
    b = sim_worker(url, queue, tmp_path, "b", **CKPT)
    with workers(b):
        _kill_when_checkpointed(r, queue, b, [job.id], 2, 0.7)
    c_log = tmp_path / "c.steps"
    with workers(sim_worker(url, queue, tmp_path, "c", step_log=str(c_log), **CKPT)):
        res = client.wait(job.id, timeout=60)
        wait_until(lambda: bool(events) and isinstance(events[-1], JobResult), timeout=30,
                   what="the stream reader")
    assert res.status is JobStatus.succeeded and res.attempts == 3
    assert res.usage.completion_tokens == MAX_TOKENS and res.text == _uninterrupted(MAX_TOKENS)
    assert res.resumed_at_token is not None and res.resumed_at_token >= 0.7 * MAX_TOKENS
    moves = [e for e in events if isinstance(e, Moved)]
    assert [m.attempt for m in moves] == [2, 3] and moves[-1].at == res.resumed_at_token
    assert moves[0].at < moves[1].at
    assert collect(events)[0] == res.text
    assert _engine_tokens(c_log) == MAX_TOKENS - res.resumed_at_token
