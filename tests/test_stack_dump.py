"""``kill -USR1`` on a worker process writes its threads' stacks to its log: how a worker
whose event loop is stuck (SIGTERM unanswered) tells where it is stuck."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

pytestmark = pytest.mark.fault


def test_sigusr1_writes_every_threads_stack_and_the_worker_keeps_running(
        redis_server: RedisServer, tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    w = WorkerProcess(redis_server.url, "dump", log, queue="dump", engine="sim").start()
    try:
        w.wait_ready(60)
        assert w.proc is not None
        w.proc.send_signal(signal.SIGUSR1)
        # The main thread's stack (run_worker) comes last in the dump, after the others.
        wait_until(lambda: "run_worker" in log.read_text(errors="replace"),
                   timeout=10, what="the main thread's stack in the worker's log")
        text = log.read_text(errors="replace")
        assert "(most recent call first)" in text and "Current thread" in text, text[-2000:]
        assert w.proc.poll() is None  # a dump, not a death
    finally:
        assert w.stop() == 0
