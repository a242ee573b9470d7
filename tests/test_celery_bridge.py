"""Celery completion callbacks: a real Celery worker (solo pool) on the test Redis receives
the results of jobs that named it, from a real slotfill worker process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer import Client, InvalidRequest, JobStatus
from slotfill.testing.fleet import WorkerProcess
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
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
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
    w = WorkerProcess(redis_server.url, f"celery-{queue}", tmp_path / "w.log", queue=queue,
                      engine="sim", celery_broker_url=_broker(redis_server, 5)).start()
    try:
        w.wait_ready(60)
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
        deadline = time.monotonic() + 30
        while len(celery_worker.read_text().splitlines() if celery_worker.exists() else []) < 3:
            assert time.monotonic() < deadline, w.tail()
            time.sleep(0.1)
        time.sleep(0.5)  # nothing more arrives
        got = {json.loads(x)["result"]["id"]: json.loads(x)
               for x in celery_worker.read_text().splitlines()}
    finally:
        w.stop()
    assert set(got) == {plain.id, routed.id, failing.id}
    assert got[plain.id]["result"]["status"] == "succeeded"
    assert got[plain.id]["result"]["usage"]["completion_tokens"] == 4
    assert got[plain.id]["task_id"] == f"slotfill-{plain.id}"
    assert got[plain.id]["queue"] == "celery"
    assert got[routed.id]["queue"] == "llm-results"
    assert got[failing.id]["result"]["status"] == JobStatus.failed.value
    assert got[failing.id]["result"]["error"]["code"] == "prompt_too_long"
    assert "not allowed" in w.tail(200)


def test_callback_is_validated_at_submit(client: Client) -> None:
    with pytest.raises(InvalidRequest):
        client.submit(prompt="x", callback={"celery_task": "not a task name"})
    with pytest.raises(InvalidRequest):
        client.submit(prompt="x", callback={"celery_task": "a.b", "broker_url": "http://x"})
    with pytest.raises(InvalidRequest):
        client.submit(prompt="x", callback={"celery_task": "a.b", "countdown": 5})
