"""A backend in another language: only raw Redis commands, taken from PROTOCOL.md.

No ``producer`` import here on purpose: if the document is wrong, this test fails.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import pytest
import redis

from slotfill.testing.fleet import WorkerProcess

DOC = Path(__file__).resolve().parent.parent / "PROTOCOL.md"


def _submit_lua() -> str:
    blocks = re.findall(r"```lua\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    return str(blocks[0])


def test_doc_script_is_the_shipped_script() -> None:
    shipped = (DOC.parent / "producer" / "lua" / "submit_job.lua").read_text()
    assert _submit_lua().strip() == shipped.strip()


@pytest.mark.engine
def test_raw_commands_drive_a_job_end_to_end(r: redis.Redis, engine_worker: WorkerProcess
                                             ) -> None:
    q = "e2e"  # the queue the session's engine worker pulls
    job_id = secrets.token_hex(16)
    body = json.dumps({"prompt": "hello from another language", "max_tokens": 7,
                       "ignore_eos": True})
    keys = [f"slotfill:{{{q}}}:stream:normal", f"slotfill:{{{q}}}:job:{job_id}",
            f"slotfill:{{{q}}}:idem:-", f"slotfill:{{{q}}}:stream:high",
            f"slotfill:{{{q}}}:stream:normal", f"slotfill:{{{q}}}:stream:low"]
    reply = r.eval(_submit_lua(), 6, *keys, job_id, body, time.time(), 1000, "", "", "normal")
    assert [x.decode() for x in reply] == ["ok", job_id]
    assert r.hget(f"slotfill:{{{q}}}:job:{job_id}", "status") in (b"queued", b"running",
                                                                  b"succeeded")
    done = f"slotfill:{{{q}}}:done:{job_id}"
    if r.hget(f"slotfill:{{{q}}}:job:{job_id}", "result") is None:
        assert r.blmove(done, done, 60, "LEFT", "LEFT") is not None
    # A second waiter still sees the signal (rotation does not consume it).
    assert r.blmove(done, done, 1, "LEFT", "LEFT") is not None
    result = json.loads(r.hget(f"slotfill:{{{q}}}:job:{job_id}", "result"))
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
