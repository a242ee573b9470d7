"""Live-load mode ``gateway``: slotfill's OpenAI-compatible front door (``slotfill gateway``,
a subprocess) in front of the slotfill mode's worker, driven over HTTP exactly like the
``serve`` mode: the same completions bodies, the same SSE reader. The gateway's chunks carry
text only (no token ids), so the total token count comes from the final usage chunk; the
time to first token is the first chunk with text, which needs a tokenizer: with
``--skip-tokenizer-init`` only end-to-end figures mean anything, and the bench leaves this
mode out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import httpx

from bench.modes.live_serve import body, read_sse
from bench.modes.live_slotfill import QUEUE
from bench.modes.openloop import Sample, Send
from bench.workload import Request
from slotfill.testing.redis_server import free_port


@contextmanager
def gateway(redis_url: str, run_dir: Path, ready_timeout: float = 120) -> Iterator[str]:
    """``slotfill gateway`` on the slotfill mode's queue; yields its base URL."""
    port = free_port()
    log = run_dir / "live-gateway.log"
    env = {**os.environ, "SLOTFILL_REDIS_URL": redis_url, "SLOTFILL_QUEUE": QUEUE,
           "SLOTFILL_GATEWAY_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "slotfill", "gateway"], env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"gateway did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def sender(http: aiohttp.ClientSession, base: str, timeout: float) -> Send:
    async def send(req: Request, s: Sample) -> None:
        payload = {k: v for k, v in body(req).items() if k != "return_token_ids"}
        await read_sse(http, base + "/v1/completions", payload, s, timeout)

    return send
