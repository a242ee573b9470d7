"""A backend in another language: only raw Redis commands, taken from PROTOCOL.md.

No ``producer`` import here on purpose: if the document is wrong, this test fails.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer

DOC = Path(__file__).resolve().parent.parent / "PROTOCOL.md"


CLIENT_SCRIPTS = ("submit_job", "cancel_job", "replay_dead_letter", "wait_jobs")
"""Every script a backend in another language calls: each must be in the document."""


def doc_scripts() -> dict[str, str]:
    """The document's ```lua blocks, by the script name their first line gives."""
    out: dict[str, str] = {}
    for block in re.findall(r"```lua\n(.*?)```", DOC.read_text(), re.S):
        m = re.match(r"-- (\w+):", block)
        assert m, f"a lua block without its name: {block[:60]!r}"
        assert m.group(1) not in out
        out[m.group(1)] = str(block)
    return out


def _submit_lua() -> str:
    return doc_scripts()["submit_job"]


def _raw_wait(r: redis.Redis, q: str, job_id: str, timeout: int) -> Any:
    """PROTOCOL.md, "Reading the result": register with wait_jobs, then pop the result off
    the waiter list."""
    token = secrets.token_hex(16)
    waiter, job = f"slotfill:{{{q}}}:waiter:{token}", f"slotfill:{{{q}}}:job:{job_id}"
    (got,) = r.eval(doc_scripts()["wait_jobs"], 2, waiter, job, token, timeout, job_id)
    if got == 1:  # registered: the job's end pushes its result onto the waiter list
        popped = r.blpop([waiter], timeout)
        assert popped is not None
        got = popped[1]
    assert got not in (0, None)
    result = json.loads(got)
    assert result["id"] == job_id
    return result


@pytest.mark.parametrize("name", CLIENT_SCRIPTS)
def test_doc_script_is_the_shipped_script(name: str) -> None:
    shipped = (DOC.parent / "producer" / "lua" / f"{name}.lua").read_text()
    assert doc_scripts()[name].strip() == shipped.strip()


def test_doc_carries_only_shipped_scripts() -> None:
    assert set(doc_scripts()) == set(CLIENT_SCRIPTS)


@pytest.mark.engine
def test_raw_commands_drive_a_job_end_to_end(r: redis.Redis, engine_worker: WorkerProcess
                                             ) -> None:
    q = "e2e"  # the queue the session's engine worker pulls
    job_id = secrets.token_hex(16)
    body = json.dumps({"prompt": "hello from another language", "max_tokens": 7,
                       "ignore_eos": True})
    keys = [f"slotfill:{{{q}}}:stream:normal", f"slotfill:{{{q}}}:job:{job_id}",
            f"slotfill:{{{q}}}:idem:-", f"slotfill:{{{q}}}:stream:high",
            f"slotfill:{{{q}}}:stream:normal", f"slotfill:{{{q}}}:stream:low",
            f"slotfill:{{{q}}}:config"]
    reply = r.eval(_submit_lua(), 7, *keys, job_id, body, "")
    assert [x.decode() for x in reply] == ["ok", job_id]
    assert r.hget(f"slotfill:{{{q}}}:job:{job_id}", "status") in (b"queued", b"running",
                                                                  b"succeeded")
    result = _raw_wait(r, q, job_id, 60)
    # A second waiter, registered after the end, gets the result at once.
    assert _raw_wait(r, q, job_id, 1) == result
    assert result["status"] == "succeeded" and result["usage"]["completion_tokens"] == 7
    assert r.hget(f"slotfill:{{{q}}}:job:{job_id}", "status") == b"succeeded"
    assert r.ttl(f"slotfill:{{{q}}}:job:{job_id}") > 0


@pytest.mark.engine
def test_plain_xadd_without_the_script_also_runs(r: redis.Redis, engine_worker: WorkerProcess
                                                 ) -> None:
    q = "e2e"
    job_id = secrets.token_hex(16)
    r.xadd(f"slotfill:{{{q}}}:stream:normal",
           {"id": job_id, "body": json.dumps({"prompt": "plain", "max_tokens": 3,
                                               "ignore_eos": True})})
    done = f"slotfill:{{{q}}}:done:{job_id}"
    assert r.blmove(done, done, 60, "LEFT", "LEFT") is not None
    result = json.loads(r.hget(f"slotfill:{{{q}}}:job:{job_id}", "result"))
    assert result["status"] == "succeeded" and result["usage"]["completion_tokens"] == 3


def test_raw_commands_route_a_job_to_its_shard(r: redis.Redis, redis_server: RedisServer,
                                               queue: str, inproc: Callable[..., Any]) -> None:
    """PROTOCOL.md, "Sharded queues": read the layout, pick the shard by CRC-32, submit and
    wait there (the layout itself is an operator's: written by ``slotfill configure``)."""
    out = subprocess.run([sys.executable, "-m", "slotfill", "configure", "--shards", "3",
                          "-q", queue, "--redis-url", redis_server.url], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    inproc("raw").wait_ready()
    shards, names = r.hmget(f"slotfill:{{{queue}}}:config", "shards", "shard_names")
    n, listed = int(shards or 0), (names or b"").decode().split(",")
    assert n == 3 and listed[0] == queue and len(listed) == 3
    for _ in range(6):
        job_id = secrets.token_hex(16)
        q = listed[zlib.crc32(job_id.encode()) % n]
        keys = [f"slotfill:{{{q}}}:stream:normal", f"slotfill:{{{q}}}:job:{job_id}",
                f"slotfill:{{{q}}}:idem:-", f"slotfill:{{{q}}}:stream:high",
                f"slotfill:{{{q}}}:stream:normal", f"slotfill:{{{q}}}:stream:low",
                f"slotfill:{{{q}}}:config"]
        body = json.dumps({"prompt": "from another language", "max_tokens": 3})
        assert [x.decode() for x in r.eval(_submit_lua(), 7, *keys, job_id, body, "")] == [
            "ok", job_id]
        assert _raw_wait(r, q, job_id, 30)["status"] == "succeeded"
