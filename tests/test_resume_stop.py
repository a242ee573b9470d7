"""A checkpoint can hold a generation that had already ended: the worker died after the
engine's last output (EOS, a stop token, a stop string) was checkpointed and before the result
was written. The resumed attempt must finish at once with that output (``stop``), not
generate past the end (simulated engine: its i-th token is ``i % 997``; it honours
``stop_token_ids`` as vLLM does)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer import Client, JobStatus
from slotfill.testing.redis_server import RedisServer
from tests.test_lifecycle import inproc_worker, workers
from worker.store import Append, WorkerStore

pytestmark = pytest.mark.fault


async def _die_after_checkpoint(url: str, queue: str, ids: list[int]) -> None:
    """A first attempt that claimed the job, checkpointed ``ids`` and died (its entry given
    back at once, as a crash report would)."""
    conn = aioredis.Redis.from_url(url)
    try:
        store = WorkerStore(conn, queue, "dead")
        await store.ensure_groups()
        [row] = await store.start_jobs(1)
        items = "".join(f"{t}," for t in ids)
        assert await store.append_tokens(
            [Append(row, "", "", 0, len(ids), 1, False, items, None)], 100, 60, 60) == [1]
        assert await store.release([row], 60, "handed_back") == 1
    finally:
        await conn.aclose()


def _engine_tokens(step_log: Path) -> int:
    return sum(json.loads(line)["tokens"] for line in step_log.read_text().splitlines())


@pytest.mark.parametrize(("fields", "carried", "text", "reason"), [
    # Its last checkpointed token is a stop token: the text leaves it out, as the engine does.
    ({"stop_token_ids": [7]}, 7, " ".join(f"t{i}" for i in range(1, 7)), "stop"),
    # A stop string lies wholly in the checkpointed text: cut there.
    ({"stop": "t5 t6"}, 8, "t1 t2 t3 t4 ", "stop"),
    # Control: the same checkpoint without a stop goes on to max_tokens.
    ({}, 7, " ".join(f"t{i}" for i in range(1, 41)), "length"),
])
def test_a_checkpoint_that_ended_the_generation_finishes_at_once(
        redis_server: RedisServer, client: Client, queue: str, tmp_path: Path,
        fields: dict[str, Any], carried: int, text: str, reason: str) -> None:
    job = client.submit("hello", max_tokens=40, **fields)
    asyncio.run(_die_after_checkpoint(redis_server.url, queue, list(range(1, carried + 1))))
    steps = tmp_path / "b.steps"
    with workers(inproc_worker(redis_server.url, queue, "b", checkpoint_interval_ms=50,
                               step_log=str(steps))):
        res = client.wait(job.id, timeout=60)
    assert res.status is JobStatus.succeeded and res.attempts == 2, res
    assert res.resumed_at_token == carried
    assert res.finish_reason == reason and res.text == text
    generated = _engine_tokens(steps)
    if reason == "stop":
        assert res.usage.completion_tokens == carried and generated == 0
    else:
        assert res.usage.completion_tokens == 40 and generated == 40 - carried
