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
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from bench.modes.live_serve import body, http_child, read_sse
from bench.modes.live_slotfill import QUEUE
from bench.modes.openloop import Sample, Send
from bench.workload import Request
from slotfill.testing.redis_server import free_port


@contextmanager
def gateway(redis_url: str, run_dir: Path, ready_timeout: float = 120) -> Iterator[str]:
    """``slotfill gateway`` on the slotfill mode's queue; yields its base URL."""
    port = free_port()
    env = {**os.environ, "SLOTFILL_REDIS_URL": redis_url, "SLOTFILL_QUEUE": QUEUE,
           "SLOTFILL_GATEWAY_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    with http_child([sys.executable, "-m", "slotfill", "gateway"], env, port,
                    run_dir / "live-gateway.log", "gateway", ready_timeout, poll_s=0.2) as base:
        yield base


def sender(http: aiohttp.ClientSession, base: str, timeout: float) -> Send:
    async def send(req: Request, s: Sample) -> None:
        payload = {k: v for k, v in body(req).items() if k != "return_token_ids"}
        await read_sse(http, base + "/v1/completions", payload, s, timeout)

    return send
