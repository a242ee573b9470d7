"""Bad input and bad conditions answer in OpenAI's error shape with the status codes the SDK
maps to its exceptions: malformed JSON, unknown fields, huge bodies, wrong keys, unknown ids,
a full queue (429 + Retry-After), Redis unreachable (503); and the metrics endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from producer import Client
from slotfill.gateway.settings import hash_key
from slotfill.testing.redis_server import RedisServer

if TYPE_CHECKING:
    from tests.gateway_kit import GatewayThread

pytest_plugins = ["tests.gateway_kit"]

MSG = [{"role": "user", "content": "hi"}]


def auth(gw: GatewayThread) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}"}


def error_of(resp: httpx.Response) -> dict[str, Any]:
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_malformed_json_is_400(gw: GatewayThread) -> None:
    resp = gw.post("/chat/completions", content=b'{"messages": [', headers=auth(gw))
    assert resp.status_code == 400
    err = error_of(resp)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
    resp = gw.post("/chat/completions", content=b"[1, 2]", headers=auth(gw))
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"


def test_unknown_fields_and_bad_values_are_400_naming_the_field(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="m", messages=MSG,  # type: ignore[call-overload]
                                    extra_body={"bogus_field": 1})
    assert e.value.param == "bogus_field" and "bogus_field" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="m", messages=MSG, temperature=7)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="m", prompt="x", n=3)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:  # priority comes from the key
        oai.completions.create(model="m", prompt="x", extra_body={"priority": "high"})
    assert e.value.param == "priority"
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="m", input="x", extra_body={"tools_x": []})
    assert e.value.param == "tools_x"


def test_huge_bodies_are_413_with_or_without_a_content_length(
        oai: openai.OpenAI, gw: GatewayThread) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(model="m", prompt="x" * 2_000_000, max_tokens=1)
    assert e.value.status_code == 413 and e.value.code == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    resp = gw.post("/completions", content=chunks(), headers=auth(gw))
    assert resp.status_code == 413 and error_of(resp)["code"] == "payload_too_large"


def test_wrong_or_missing_keys_are_401(gw: GatewayThread) -> None:
    bad = openai.OpenAI(base_url=gw.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="m", messages=MSG)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    resp = gw.get("/batches")
    assert resp.status_code == 401 and error_of(resp)["type"] == "invalid_request_error"


def test_unknown_ids_are_404(oai: openai.OpenAI, gw: GatewayThread) -> None:
    calls = [lambda: oai.files.retrieve("file-nope"), lambda: oai.files.content("file-nope"),
             lambda: oai.files.delete("file-nope"), lambda: oai.batches.retrieve("batch_nope"),
             lambda: oai.batches.cancel("batch_nope"), lambda: oai.models.retrieve("nope"),
             lambda: oai.responses.retrieve("resp_0123abcd"),
             lambda: oai.responses.cancel("resp_nope")]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    resp = gw.get("/no/such/route", headers=auth(gw))
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


def test_a_full_queue_is_429_with_retry_after(redis_server: RedisServer) -> None:
    from tests.gateway_kit import GatewayThread

    # No worker on this queue, room for one job: the second request finds the queue full.
    admin = Client.from_url(redis_server.url, queue="gw-full")
    admin.configure_queue(max_pending=1)  # the cap lives in Redis (the queue's config)
    admin.close()
    g = GatewayThread(redis_server.url, "gw-full", retry_after_seconds=3).start()
    try:
        c = openai.OpenAI(base_url=g.url, api_key="unused", max_retries=0)
        first = c.responses.create(model="m", input="a", background=True)
        assert first.status == "queued"
        with pytest.raises(openai.RateLimitError) as e:
            c.responses.create(model="m", input="b", background=True)
        assert e.value.response.headers["retry-after"] == "3"
        assert e.value.code == "queue_full"
        assert c.responses.cancel(first.id).status == "cancelled"
    finally:
        g.stop()


def test_redis_unreachable_is_503() -> None:
    from tests.gateway_kit import GatewayThread, free_port

    g = GatewayThread(f"redis://127.0.0.1:{free_port()}/0", "gw-down").start()
    try:
        c = openai.OpenAI(base_url=g.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="m", messages=MSG)
        assert e.value.status_code == 503 and e.value.code == "redis_unavailable"
        assert e.value.response.headers["retry-after"] == "1"
        assert httpx.get(g.url.removesuffix("/v1") + "/health").status_code == 503
    finally:
        g.stop()


def test_metrics_count_requests_by_route_and_status(oai: openai.OpenAI, gw: GatewayThread) -> None:
    oai.completions.create(model="m", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-missing")
    text = httpx.get(gw.url.removesuffix("/v1") + "/metrics").text
    assert 'route="/v1/completions",status="200"' in text
    assert 'route="/v1/files/{file_id}",status="404"' in text
    assert "slotfill_gateway_request_seconds_bucket" in text
    assert httpx.get(gw.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_keys_are_stored_hashed() -> None:
    from slotfill.gateway.settings import GatewaySettings

    s = GatewaySettings(api_keys=[{"sha256": hash_key("k1"), "queue": "q1"}])  # type: ignore[list-item]
    assert s.api_keys[0].sha256 != "k1" and len(s.api_keys[0].sha256) == 64
    with pytest.raises(ValueError):
        GatewaySettings(api_keys=[{"sha256": "k1", "queue": "q1"}])  # type: ignore[list-item]


def test_the_readme_documents_every_gateway_setting() -> None:
    from pathlib import Path

    from slotfill.gateway.settings import GatewaySettings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [n for n in GatewaySettings.model_fields
               if f"| `SLOTFILL_GATEWAY_{n.upper()}` |" not in readme]
    assert not missing
