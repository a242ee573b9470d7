"""The real engine (vLLM CPU build, generated tiny model) continues a job from its checkpoint:
a worker process is SIGKILLed half-way through a long greedy generation, a second one resumes
it from the carried token ids (given to vLLM as prompt ids), and only generates the rest."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from producer import Client, JobResult, JobStatus, Moved, QueueKeys, TokenDelta
from producer.streaming import StreamEvent
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer
from tests.test_resume import _engine_tokens

pytestmark = [pytest.mark.engine, pytest.mark.fault]

MAX_TOKENS = 1800
"""~2.5 s on the tiny engine here (about 750 tokens/s): time to kill it mid-way."""


def _engine(url: str, queue: str, tmp: Path, name: str) -> WorkerProcess:
    return WorkerProcess(url, name, tmp / f"{name}.log", queue=queue, max_num_seqs=4,
                         max_model_len=2048, max_num_batched_tokens=2048, lease_seconds=3,
                         heartbeat_seconds=0.5, checkpoint_interval_ms=200,
                         step_log=str(tmp / f"{name}.steps"), engine_hang_seconds=300).start()


def test_a_real_engine_resumes_a_killed_workers_job(redis_server: RedisServer, r: redis.Redis,
                                                    tmp_path: Path) -> None:
    queue = "resume-e2e"
    client = Client.from_url(redis_server.url, queue=queue)
    a = _engine(redis_server.url, queue, tmp_path, "ra")
    try:
        a.wait_ready(600)
        job = client.submit("Once upon a time", max_tokens=MAX_TOKENS, ignore_eos=True,
                            temperature=0.0, stream=True)
        events: list[StreamEvent] = []
        reader = threading.Thread(target=lambda: events.extend(client.stream(job.id, timeout=600)),
                                  daemon=True)
        reader.start()
        # Kill at the first checkpoint (it comes with the first stream write), or once the
        # engine's own step log shows a quarter done: on a loaded box the step log (and the
        # checkpoint) lag the engine, and waiting for a quarter once let the job finish first.
        key = QueueKeys.for_queue(queue).job(job.id)

        def started() -> bool:
            return (int(r.hget(key, "ckpt_tokens") or 0) > 0
                    or _engine_tokens(tmp_path / "ra.steps") >= 0.25 * MAX_TOKENS)

        wait_until(started, timeout=300, interval=0.002, what="the first checkpoint")
    finally:
        a.kill()
    b = _engine(redis_server.url, queue, tmp_path, "rb")
    try:
        b.wait_ready(600)
        res = client.wait(job.id, timeout=300)
        reader.join(60)
    finally:
        b.stop()
        client.close()
    assert res.status is JobStatus.succeeded and res.attempts == 2, res
    assert res.usage.completion_tokens == MAX_TOKENS and res.usage.prompt_tokens > 0
    assert res.resumed_at_token is not None and res.resumed_at_token > 0
    assert isinstance(events[-1], JobResult)
    moves = [e for e in events if isinstance(e, Moved)]
    assert [m.at for m in moves] == [res.resumed_at_token]
    ids = [t for e in events if isinstance(e, TokenDelta) for t in e.token_ids]
    assert len(ids) == MAX_TOKENS
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == res.text
    assert _engine_tokens(tmp_path / "rb.steps") == MAX_TOKENS - res.resumed_at_token


def test_a_real_engine_checkpoints_a_job_that_does_not_stream_and_resumes_it(
        redis_server: RedisServer, r: redis.Redis, tmp_path: Path) -> None:
    """Its checkpoints come from the ids vLLM's output processor holds (one final output per
    job, worker/engines/vllm_peek.py), not from intermediate outputs."""
    queue = "resume-e2e-plain"
    client = Client.from_url(redis_server.url, queue=queue)
    a = _engine(redis_server.url, queue, tmp_path, "pa")
    key = QueueKeys.for_queue(queue).job
    try:
        a.wait_ready(600)
        job = client.submit("Once upon a time", max_tokens=MAX_TOKENS, ignore_eos=True,
                            temperature=0.0)
        wait_until(lambda: int(r.hget(key(job.id), "ckpt_tokens") or 0) > 0, timeout=300,
                   interval=0.002, what="the first checkpoint")
    finally:
        a.kill()
    b = _engine(redis_server.url, queue, tmp_path, "pb")
    try:
        b.wait_ready(600)
        res = client.wait(job.id, timeout=300)
    finally:
        b.stop()
        client.close()
    assert res.status is JobStatus.succeeded and res.attempts == 2, res
    assert res.usage.completion_tokens == MAX_TOKENS
    assert res.resumed_at_token is not None and 0 < res.resumed_at_token < MAX_TOKENS
    assert _engine_tokens(tmp_path / "pb.steps") == MAX_TOKENS - res.resumed_at_token
