"""A gateway served by uvicorn in a thread of the test process, on a free port, and the
fixtures of the gateway tests (a pytest plugin: ``pytest_plugins = ["tests.gateway_kit"]``):
one simulated-engine worker and one gateway for the whole session."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from producer import ClientSettings
from slotfill.gateway.app import create_app
from slotfill.gateway.settings import GatewaySettings, hash_key
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer, free_port


class GatewayThread:
    def __init__(self, redis_url: str, queue: str, client: dict[str, Any] | None = None,
                 **settings: Any) -> None:
        # The test kit's free_port, not bind(0): below the ephemeral range and, under
        # pytest-xdist, from this worker's share of the ports.
        self.port = free_port()
        self.queue = queue
        self.key, self.other_key, self.other_queue = KEY, OTHER_KEY, OTHER_QUEUE
        gs = GatewaySettings(port=self.port, **settings)
        cs = ClientSettings(redis_url=redis_url, queue=queue, **(client or {}))
        config = uvicorn.Config(create_app(gs, cs), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> GatewayThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=15,
                   what="the gateway to start")
        if not self.server.started:
            raise RuntimeError("gateway did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)


QUEUE = "gw-main"
KEY = "sk-test-main-0123456789"
OTHER_KEY = "sk-test-other-0123456789"
OTHER_QUEUE = "gw-other"


@pytest.fixture(scope="session")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    d = tmp_path_factory.mktemp("gw-worker")
    w = WorkerProcess(redis_server.url, "gw-sim", d / "w.log", queue=QUEUE, engine="sim",
                      model="sim-model", sim_step_ms=3, max_num_seqs=16, headroom=4,
                      stream_interval_ms=10, heartbeat_seconds=0.5,
                      max_model_len=8192).start()
    try:
        w.wait_ready(60)
        yield w
    finally:
        w.stop(20)


def api_keys() -> list[dict[str, str]]:
    return [{"sha256": hash_key(KEY), "name": "main", "queue": QUEUE},
            {"sha256": hash_key(OTHER_KEY), "name": "other", "queue": OTHER_QUEUE,
             "priority": "high"}]


@pytest.fixture(scope="session")
def gw(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[GatewayThread]:
    g = GatewayThread(redis_server.url, QUEUE, api_keys=api_keys(),
                      batch_pump_seconds=0.2).start()
    yield g
    g.stop()


@pytest.fixture
def oai(gw: GatewayThread) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gw.url, api_key=gw.key, max_retries=0, timeout=20)
    yield c
    c.close()


