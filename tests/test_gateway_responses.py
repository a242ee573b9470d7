"""The Responses API through the ``openai`` SDK: foreground, background + polling, a
background event stream resumed after a disconnect on a second gateway instance, cancel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import openai
import pytest

from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

if TYPE_CHECKING:
    from tests.gateway_kit import GatewayThread

pytest_plugins = ["tests.gateway_kit"]


@pytest.fixture
def second(redis_server: RedisServer, gw: GatewayThread) -> Iterator[GatewayThread]:
    """Another instance, sharing nothing with the first but Redis and its settings."""
    from tests.gateway_kit import GatewayThread as Gw
    from tests.gateway_kit import api_keys

    g = Gw(redis_server.url, gw.queue, api_keys=api_keys()).start()
    yield g
    g.stop()


def test_a_foreground_response_waits_and_answers(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="sim-model", input="hello", instructions="be brief",
                             max_output_tokens=10)
    assert r.id.startswith("resp_") and r.status == "incomplete"  # the sim always hits the cap
    assert r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    assert len(r.output_text.split()) == 10 and r.usage and r.usage.output_tokens == 10
    assert r.instructions == "be brief"


def test_a_background_response_is_queued_then_polled(oai: openai.OpenAI,
                                                     second: GatewayThread) -> None:
    r = oai.responses.create(model="sim-model", max_output_tokens=40, background=True,
                             input=[{"role": "user", "content": "poll me"}])
    assert r.status in ("queued", "in_progress") and r.background
    other = openai.OpenAI(base_url=second.url, api_key=second.key, max_retries=0)
    got = wait_until(lambda: (g := other.responses.retrieve(r.id)).status not in (
        "queued", "in_progress") and g, timeout=15, what="the response to end")
    assert got.status == "incomplete" and len(got.output_text.split()) == 40


def test_a_background_stream_resumes_on_another_instance(oai: openai.OpenAI,
                                                         second: GatewayThread) -> None:
    stream = oai.responses.create(model="sim-model", input="a long story", stream=True,
                                  background=True, max_output_tokens=600)
    seen: list[Any] = []
    for ev in stream:
        seen.append(ev)
        if sum(e.type == "response.output_text.delta" for e in seen) >= 3:
            break
    stream.close()  # the client drops; a background response keeps running
    resp_id = seen[0].response.id
    last = seen[-1].sequence_number
    other = openai.OpenAI(base_url=second.url, api_key=second.key, max_retries=0)
    rest = list(other.responses.retrieve(resp_id, stream=True, starting_after=last))
    assert [e.sequence_number for e in seen + rest] == list(range(len(seen) + len(rest)))
    assert [e.type for e in rest[-4:]] == ["response.output_text.done",
                                           "response.content_part.done",
                                           "response.output_item.done", "response.incomplete"]
    text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
    assert text == rest[-1].response.output_text and len(text.split()) == 600
    assert oai.responses.retrieve(resp_id).output_text == text
    # A reader from the very start on either instance sees the same numbered events.
    again = list(oai.responses.retrieve(resp_id, stream=True))
    assert [(e.sequence_number, e.type) for e in again] == \
        [(e.sequence_number, e.type) for e in seen + rest]


def test_cancelling_a_background_response(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="sim-model", input="forever", background=True,
                             max_output_tokens=5000)
    wait_until(lambda: oai.responses.retrieve(r.id).status != "queued", timeout=10,
               what="the response to start")
    assert oai.responses.cancel(r.id).status == "cancelled"
    assert oai.responses.retrieve(r.id).status == "cancelled"
    fg = oai.responses.create(model="sim-model", input="x", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):  # only background responses are cancellable
        oai.responses.cancel(fg.id)


async def test_async_foreground_stream(gw: GatewayThread) -> None:
    async with openai.AsyncOpenAI(base_url=gw.url, api_key=gw.key, max_retries=0) as c:
        stream = await c.responses.create(model="sim-model", input="hi", stream=True,
                                          max_output_tokens=25)
        events = [e async for e in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert len(text.split()) == 25 and events[-1].response.output_text == text
