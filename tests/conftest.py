"""Shared fixtures: a real redis-server per session; workers in-process (simulated engine) for
logic tests, as real subprocesses where a process must die or the shell command is tested."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.redis_server import RedisServer

_queue_ids = itertools.count()

ENGINE_SLOTS = 8
ENGINE_HEADROOM = 4


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(appendfsync="everysec", workdir=str(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def queue() -> str:
    """A fresh queue name per test, so tests never see each other's jobs."""
    return f"t{os.getpid()}-{next(_queue_ids)}"


@pytest.fixture
def client(redis_server: RedisServer, queue: str) -> Iterator[Client]:
    c = Client.from_url(redis_server.url, queue=queue)
    yield c
    c.close()


@pytest.fixture
def inproc(redis_server: RedisServer, queue: str) -> Iterator[Callable[..., InprocWorker]]:
    """Make in-process simulated-engine workers on this test's queue (``inproc("a",
    max_num_seqs=4)``, started); whatever is still running at the end is drained."""
    made: list[InprocWorker] = []

    def make(name: str, **settings: Any) -> InprocWorker:
        w = InprocWorker(redis_server.url, name, **{"queue": queue, **settings}).start()
        made.append(w)
        return w

    yield make
    for w in made:
        if w.alive:
            w.stop(30)


@pytest.fixture(scope="session")
def engine_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[WorkerProcess]:
    """One real vLLM engine (CPU build, generated tiny model) for the whole session."""
    d = tmp_path_factory.mktemp("engine-worker")
    w = WorkerProcess(
        redis_server.url, "engine-worker", d / "worker.log", queue="e2e",
        max_num_seqs=ENGINE_SLOTS, headroom=ENGINE_HEADROOM, max_model_len=512,
        max_num_batched_tokens=1024, step_log=str(d / "steps.jsonl"),
        lease_seconds=30, engine_hang_seconds=300,
    ).start()
    try:
        w.wait_ready(timeout=600)
    except Exception:
        w.kill()
        raise
    yield w
    w.stop()


@pytest.fixture
def engine_client(redis_server: RedisServer, engine_worker: WorkerProcess) -> Iterator[Client]:
    c = Client.from_url(redis_server.url, queue="e2e")
    yield c
    c.close()


def step_log_path(w: WorkerProcess) -> Path:
    return Path(w.env["SLOTFILL_STEP_LOG"])
