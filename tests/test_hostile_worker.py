"""Entries added without the submit step (plain ``XADD``, any language) meet the same rules in
the worker: strict JSON types, UTF-8, a priority that is its stream's, usable ids."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest
import redis

from producer.keys import QueueKeys
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer

pytestmark = pytest.mark.fault


def _result(r: redis.Redis, keys: QueueKeys, job_id: str, timeout: float = 20.0) -> dict:
    end = time.monotonic() + timeout
    while (raw := r.hget(keys.job(job_id), "result")) is None:
        assert time.monotonic() < end, f"job {job_id} has no result"
        time.sleep(0.05)
    out: dict = json.loads(raw)
    return out


def test_plain_xadd_bodies_are_held_to_the_wire_rules(
        redis_server: RedisServer, r: redis.Redis, queue: str, tmp_path: Path) -> None:
    keys = QueueKeys.for_queue(queue)
    cases = {
        "coerced_int": ("normal", b'{"prompt": "x", "max_tokens": "10"}', "invalid_request"),
        "coerced_bool": ("normal", b'{"prompt": "x", "stream": "yes"}', "invalid_request"),
        "coerced_eos": ("normal", b'{"prompt": "x", "ignore_eos": "true"}', "invalid_request"),
        "bad_utf8": ("normal", b'{"prompt": "caf\xe9", "max_tokens": 2}', "undecodable"),
        "wrong_level": ("low", b'{"prompt": "x", "priority": "high"}', "invalid_request"),
        "fine": ("normal", '{"prompt": "café", "max_tokens": 2}'.encode(), None),
    }
    ids = {name: secrets.token_hex(16) for name in cases}
    for name, (level, body, _code) in cases.items():
        r.xadd(keys.stream(level), {"id": ids[name], "body": body})
    w = WorkerProcess(redis_server.url, "strict", tmp_path / "w.log", queue=queue,
                      engine="sim", sim_step_ms=5, lease_seconds=2).start()
    try:
        w.wait_ready(60)
        for name, (_level, _body, code) in cases.items():
            res = _result(r, keys, ids[name])
            if code is None:
                assert res["status"] == "succeeded", res
            else:
                assert res["status"] == "failed" and res["error"]["code"] == code, (name, res)
                assert res["finish_reason"] == "failed" and res["text"] == ""
                assert res["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    finally:
        w.stop(30)
