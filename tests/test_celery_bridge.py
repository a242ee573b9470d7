"""Celery completion callbacks: a real Celery worker (solo pool) on the test Redis receives
the results of jobs that named it, from a slotfill worker (in-process, simulated engine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer import Client, InvalidRequest, JobStatus
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def _broker(redis_server: RedisServer, db: int) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


@pytest.fixture
def celery_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "received.jsonl"
    log = tmp_path / "celery.log"
    env = {**os.environ, "CELERY_TEST_BROKER": _broker(redis_server, 5),
           "CELERY_TEST_OUT": str(out)}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool", "solo",
             "-Q", "celery,llm-results", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "info"],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            return b"ready." in log.read_bytes()

        wait_until(ready, timeout=60, interval=0.1, what="the Celery worker to be ready")
        yield out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_results_reach_the_backends_celery_tasks(redis_server: RedisServer, queue: str,
                                                 celery_worker: Path, tmp_path: Path) -> None:
    w = InprocWorker(redis_server.url, f"celery-{queue}", queue=queue, engine="sim",
                     celery_broker_url=_broker(redis_server, 5))
    with w:
        c = Client.from_url(redis_server.url, queue=queue)
        plain = c.submit(prompt="hello", max_tokens=4,
                         callback={"celery_task": "backend.on_llm_result"})
        routed = c.submit(messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                          callback={"celery_task": "backend.on_llm_result",
                                    "queue": "llm-results"})
        failing = c.submit(prompt="x " * 600, max_tokens=4,
                           callback={"celery_task": "backend.on_llm_result"})
        # A broker the worker was not told about: refused, never contacted.
        elsewhere = c.submit(prompt="hello", max_tokens=2,
                             callback={"celery_task": "backend.on_llm_result",
                                       "broker_url": _broker(redis_server, 6)})
        no_callback = c.submit(prompt="hello", max_tokens=2)
        for job in (plain, routed, failing, elsewhere, no_callback):
            c.wait(job.id, timeout=30)
    # Stopped: the worker has sent every callback it was going to send, and says which.
    sent = {line.split("job ")[1].split(":")[0] for line in w.log_text().splitlines()
            if line.endswith(" sent") and ": callback " in line}
    assert sent == {plain.id, routed.id, failing.id}, w.tail()
    # Nothing was ever written to the broker the worker was not told about.
    assert redis.Redis.from_url(_broker(redis_server, 6)).dbsize() == 0

    def received() -> list[str]:
        return celery_worker.read_text().splitlines() if celery_worker.exists() else []

    wait_until(lambda: len(received()) >= len(sent), timeout=30, interval=0.1,
               what="the Celery task to receive every sent callback")
    got = {json.loads(x)["result"]["id"]: json.loads(x) for x in received()}
    assert len(got) == len(received())
    assert set(got) == {plain.id, routed.id, failing.id}
    assert got[plain.id]["result"]["status"] == "succeeded"
    assert got[plain.id]["result"]["usage"]["completion_tokens"] == 4
    assert got[plain.id]["task_id"] == f"slotfill-{plain.id}"
    assert got[plain.id]["queue"] == "celery"
    assert got[routed.id]["queue"] == "llm-results"
    assert got[failing.id]["result"]["status"] == JobStatus.failed.value
    assert got[failing.id]["result"]["error"]["code"] == "prompt_too_long"
    assert "not allowed" in w.log_text()


def test_callback_is_validated_at_submit(fake_client: Client) -> None:
    with pytest.raises(InvalidRequest):
        fake_client.submit(prompt="x", callback={"celery_task": "not a task name"})
    with pytest.raises(InvalidRequest):
        fake_client.submit(prompt="x", callback={"celery_task": "a.b", "broker_url": "http://x"})
    with pytest.raises(InvalidRequest):
        fake_client.submit(prompt="x", callback={"celery_task": "a.b", "countdown": 5})
