"""The real engine (vLLM CPU build, generated tiny model) continues a job that does not stream
from its checkpoint: a worker process is SIGKILLed at its first checkpoint, a second one resumes
it from the carried token ids and only generates the rest. (A streaming job's resume on the real
engine is checked inside the real-engine kill test, tests/test_faults_kill.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from producer import Client, JobStatus, QueueKeys
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
