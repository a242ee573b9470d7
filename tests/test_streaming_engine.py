"""Streaming on the real vLLM engine (CPU build, tiny model), through the client and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from producer import Client, JobResult, JobStatus, TokenDelta
from slotfill.testing.fleet import WorkerProcess
from worker.engines.vllm import MAX_STREAM_WINDOW_TOKENS

pytestmark = pytest.mark.engine


def test_real_engine_streams_deltas_that_add_up_to_the_result(engine_client: Client) -> None:
    # More than the engine's largest output: it hands output over once per 50 ms window, in
    # tokens from the measured step time (~48 at the tiny model's ~1 ms steps) but up to
    # MAX_STREAM_WINDOW_TOKENS (256) when steps run fast; 200 tokens came as one piece once
    # in CI (nothing to check then). The shared engine's max_model_len is 512.
    n = 500
    assert n > MAX_STREAM_WINDOW_TOKENS
    plain = engine_client.submit("queue slot engine", max_tokens=n, ignore_eos=True,
                                 temperature=0, seed=3)
    job = engine_client.submit("queue slot engine", max_tokens=n, ignore_eos=True,
                               temperature=0, seed=3, stream=True)
    events = list(engine_client.stream(job.id, timeout=180))
    res = events[-1]
    assert isinstance(res, JobResult) and res.status is JobStatus.succeeded
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert len(deltas) >= 2, "the output came in one piece: nothing was streamed"
    assert "".join(d.text for d in deltas) == res.text
    assert sum(len(d.token_ids) for d in deltas) == res.usage.completion_tokens == n
    # Streaming changes how the output travels, not what it is.
    assert engine_client.wait(plain.id, timeout=180).text == res.text


def test_cli_submit_stream_prints_the_text_as_it_comes(
        engine_client: Client, engine_worker: WorkerProcess) -> None:
    env = {**os.environ, "SLOTFILL_REDIS_URL": engine_worker.redis_url, "SLOTFILL_QUEUE": "e2e"}
    out = subprocess.run(
        [sys.executable, "-m", "slotfill", "submit", "--stream", "--max-tokens", "24",
         "--timeout", "180", "hello stream"], env=env, capture_output=True,
        timeout=240, check=False)
    # Bytes, not text=True: universal newlines would turn a generated "\r" into "\n".
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, stderr
    job_id = stderr.split("job ", 1)[1].split()[0]
    res = engine_client.wait(job_id, timeout=5)
    assert stdout == res.text + "\n"
    assert "succeeded" in stderr and f"{res.usage.completion_tokens} tokens" in stderr
