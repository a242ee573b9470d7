"""Files and Batches through the ``openai`` SDK: a batch end to end with output and error
files, a batch larger than the queue's cap (the gateway submits the rest as room frees),
cancelling a batch, and files' lifecycle."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import openai
import pytest

from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

if TYPE_CHECKING:
    from openai.types import Batch

    from tests.gateway_kit import GatewayThread

pytest_plugins = ["tests.gateway_kit"]

CHAT = "/v1/chat/completions"


def line(cid: str, url: str = CHAT, **body: Any) -> str:
    body.setdefault("model", "sim-model")
    if url == CHAT:
        body.setdefault("messages", [{"role": "user", "content": f"q {cid}"}])
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def upload(c: openai.OpenAI, lines: list[str]) -> str:
    f = c.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    return f.id


def wait_batch(c: openai.OpenAI, batch_id: str, until: tuple[str, ...],
               timeout: float = 20.0) -> Batch:
    def done() -> Batch | None:
        b = c.batches.retrieve(batch_id)
        return b if b.status in until else None

    return wait_until(done, timeout=timeout, interval=0.1, what=f"batch {batch_id} {until}")


def jsonl(c: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    rows = [json.loads(x) for x in c.files.content(file_id).text.splitlines()]
    return {r["custom_id"]: r for r in rows}


def test_a_batch_end_to_end_with_output_and_error_files(oai: openai.OpenAI) -> None:
    lines = [line(f"r{i}", max_tokens=4 + i) for i in range(6)]
    lines.append(line("bad-temp", temperature=9))
    lines.append(line("other-url", url="/v1/completions", prompt="x"))
    file_id = upload(oai, lines)
    assert oai.files.retrieve(file_id).purpose == "batch"
    b = oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h",
                           metadata={"run": "e2e"})
    assert b.status == "in_progress" and b.request_counts and b.request_counts.total == 8
    b = wait_batch(oai, b.id, ("completed",))
    assert b.request_counts is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (6, 2)
    assert b.metadata == {"run": "e2e"} and b.completed_at is not None
    out, errs = jsonl(oai, b.output_file_id), jsonl(oai, b.error_file_id)
    assert sorted(out) == [f"r{i}" for i in range(6)] and sorted(errs) == ["bad-temp", "other-url"]
    for i in range(6):
        body = out[f"r{i}"]["response"]["body"]
        assert out[f"r{i}"]["response"]["status_code"] == 200
        assert body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 4 + i
    assert errs["bad-temp"]["response"]["status_code"] == 400
    assert "temperature" in errs["bad-temp"]["response"]["body"]["error"]["message"]
    assert b.id in [x.id for x in oai.batches.list()]
    assert oai.files.retrieve(b.output_file_id or "").purpose == "batch_output"
    assert oai.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(file_id)
    assert oai.batches.retrieve(b.id).status == "completed"  # finished batches keep their files


@pytest.mark.slow
def test_a_batch_larger_than_the_queue_cap_is_fed_as_room_frees(
        redis_server: RedisServer, gw: GatewayThread) -> None:
    from tests.gateway_kit import GatewayThread as Gw

    small = Gw(redis_server.url, gw.queue, client={"max_pending": 3},
               batch_pump_seconds=0.1).start()
    try:
        c = openai.OpenAI(base_url=small.url, api_key="unused", max_retries=0)
        file_id = upload(c, [line(f"k{i}", max_tokens=20) for i in range(15)])
        b = c.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
        b = wait_batch(c, b.id, ("completed",), timeout=30)
        assert b.request_counts is not None and b.request_counts.completed == 15
        assert sorted(jsonl(c, b.output_file_id)) == sorted(f"k{i}" for i in range(15))
        assert b.error_file_id is None
    finally:
        small.stop()


def test_cancelling_a_batch_cancels_its_jobs_and_keeps_finished_results(
        oai: openai.OpenAI) -> None:
    lines = [line("quick", max_tokens=2)] + [line(f"slow{i}", max_tokens=4000)
                                             for i in range(3)]
    b = oai.batches.create(input_file_id=upload(oai, lines), endpoint=CHAT,
                           completion_window="24h")
    wait_until(lambda: oai.batches.retrieve(b.id).request_counts.completed >= 1,  # type: ignore[union-attr]
               timeout=10, what="the quick line to complete")
    b = oai.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled")
    b = wait_batch(oai, b.id, ("cancelled",))
    assert sorted(jsonl(oai, b.output_file_id)) == ["quick"]
    errs = jsonl(oai, b.error_file_id)
    assert sorted(errs) == ["slow0", "slow1", "slow2"]
    assert all(e["error"]["code"] == "cancelled" for e in errs.values())


def test_a_file_that_is_not_a_batch_file_is_refused(oai: openai.OpenAI) -> None:
    file_id = upload(oai, ['{"custom_id": "a"', line("b")])
    with pytest.raises(openai.BadRequestError) as e:
        oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert "line 1" in e.value.message
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-gone", endpoint=CHAT, completion_window="24h")
