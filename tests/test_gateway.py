"""The gateway driven by the official ``openai`` SDK against real (simulated-engine) workers:
chat and completions, sync and async, streaming, models, and a client that disconnects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
import redis

from producer import Client, ClientSettings, JobStatus
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

if TYPE_CHECKING:
    from tests.gateway_kit import GatewayThread

pytest_plugins = ["tests.gateway_kit"]


def test_chat_completion_waits_for_the_job_and_answers_openai_shaped(
        oai: openai.OpenAI, gw: GatewayThread, redis_server: RedisServer) -> None:
    out = oai.chat.completions.create(model="sim-model", max_tokens=12, messages=[
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert out.object == "chat.completion" and out.model == "sim-model"
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert out.usage is not None and out.usage.completion_tokens == 12
    job_id = out.id.removeprefix("chatcmpl-")
    res = Client.from_url(redis_server.url, queue=gw.queue).result(job_id)
    assert res is not None and res.text == choice.message.content


def test_completion_streams_chunks_that_add_up_to_the_result(
        oai: openai.OpenAI, gw: GatewayThread, redis_server: RedisServer) -> None:
    chunks = list(oai.completions.create(model="sim-model", prompt="once", max_tokens=40,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    job_id = chunks[0].id.removeprefix("cmpl-")
    res = Client.from_url(redis_server.url, queue=gw.queue).result(job_id)
    assert res is not None and res.text == text and len(chunks) > 3


async def test_async_chat_stream(gw: GatewayThread) -> None:
    async with openai.AsyncOpenAI(base_url=gw.url, api_key=gw.key, max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="sim-model", max_tokens=30, stream=True,
            messages=[{"role": "user", "content": "stream please"}])
        parts = [ch async for ch in stream]
        plain = await c.chat.completions.create(
            model="sim-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    assert len(text.split()) == 30 and parts[-1].choices[0].finish_reason == "length"
    assert plain.choices[0].message.content and plain.usage and plain.usage.completion_tokens == 5


def test_models_lists_what_live_workers_serve(oai: openai.OpenAI, gw: GatewayThread) -> None:
    assert [m.id for m in oai.models.list()] == ["sim-model"]
    assert oai.models.retrieve("sim-model").owned_by == "slotfill"
    other = openai.OpenAI(base_url=gw.url, api_key=gw.other_key, max_retries=0)
    assert list(other.models.list()) == []  # no worker on that key's queue


def test_a_client_that_disconnects_mid_stream_cancels_its_job(
        gw: GatewayThread, r: redis.Redis) -> None:
    c = openai.OpenAI(base_url=gw.url, api_key=gw.key, max_retries=0)
    stream = c.chat.completions.create(model="sim-model", max_tokens=5000, stream=True,
                                       messages=[{"role": "user", "content": "long"}])
    first = [next(stream) for _ in range(3)]
    job_id = first[0].id.removeprefix("chatcmpl-")
    stream.close()
    client = Client(r, ClientSettings(queue=gw.queue))
    wait_until(lambda: client.status(job_id) is JobStatus.cancelled, timeout=10,
               what=f"job {job_id} to be cancelled")
    res = client.result(job_id)
    assert res is not None and res.usage.completion_tokens < 5000
    metrics = httpx.get(gw.url.removesuffix("/v1") + "/metrics").text
    assert any(line.startswith("slotfill_gateway_jobs_abandoned_total") and float(line.split()[-1]) >= 1
               for line in metrics.splitlines())




def test_the_slotfill_gateway_command_serves_with_settings_from_the_environment(
        gw: GatewayThread, redis_server: RedisServer, tmp_path: Path) -> None:
    from tests.gateway_kit import api_keys, free_port

    port = free_port()
    env = {**os.environ, "SLOTFILL_REDIS_URL": redis_server.url,
           "SLOTFILL_GATEWAY_API_KEYS": json.dumps(api_keys()), "SLOTFILL_GATEWAY_PORT": str(port)}
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "slotfill", "gateway"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                return httpx.get(base + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=30, interval=0.1, what="the gateway's /health")
        c = openai.OpenAI(base_url=base + "/v1", api_key=gw.key, max_retries=0)
        assert [m.id for m in c.models.list()] == ["sim-model"]
        out = c.completions.create(model="sim-model", prompt="p", max_tokens=3)
        assert out.usage is not None and out.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_client_that_gives_up_waiting_cancels_its_job(gw: GatewayThread, r: redis.Redis) -> None:
    client = Client(r, ClientSettings(queue=gw.queue))
    before = set(_job_ids(r, gw.queue))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/completions", headers={"Authorization": f"Bearer {gw.key}"},
                   json={"prompt": "long", "max_tokens": 5000}, timeout=0.5)
    (job_id,) = wait_until(lambda: set(_job_ids(r, gw.queue)) - before, timeout=10,
                           what="the request's job")
    wait_until(lambda: client.status(job_id) is JobStatus.cancelled, timeout=10,
               what=f"job {job_id} to be cancelled")


def _job_ids(r: redis.Redis, queue: str) -> list[str]:
    prefix = f"slotfill:{{{queue}}}:job:"
    return [k.decode()[len(prefix):] for k in r.scan_iter(match=prefix + "*", count=1000)]
