"""A gateway served by uvicorn in a thread of the test process, on a free port."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import uvicorn

from producer import ClientSettings
from slotfill.gateway.app import create_app
from slotfill.gateway.settings import GatewaySettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayThread:
    def __init__(self, redis_url: str, queue: str, **settings: Any) -> None:
        self.port = free_port()
        gs = GatewaySettings(port=self.port, **settings)
        cs = ClientSettings(redis_url=redis_url, queue=queue)
        config = uvicorn.Config(create_app(gs, cs), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "gateway did not start"
            assert self.thread.is_alive(), "gateway thread died"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)
