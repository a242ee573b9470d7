"""The client-facing Lua steps trust no caller: hostile KEYS and ARGV sent with raw EVALSHA
(as a backend in any language can) are refused with ``ERR slotfill:<reason>`` and write
nothing; the cap and the clock are the queue's and Redis', not the caller's."""

from __future__ import annotations

import json
import math
import secrets
import time

import pytest
import redis

from producer import Client, InvalidRequest, Refused
from producer.keys import QueueKeys
from producer.protocol import refusal
from producer.scripts import source


def _sha(r: redis.Redis, name: str) -> str:
    return str(r.script_load(source(name)))


def _submit_keys(q: str, job_id: str, priority: str = "normal", idem: str = "-") -> list[str]:
    k = QueueKeys.for_queue(q)
    return [k.stream(priority), k.job(job_id), k.idempotency(idem), *k.streams, k.config]


def _submit(r: redis.Redis, q: str, job_id: str, body: str | bytes, ttl: str = "",
            keys: list[str] | None = None) -> list[str]:
    reply = r.evalsha(_sha(r, "submit_job"), 7, *(keys or _submit_keys(q, job_id)),
                      job_id, body, ttl)
    return [x.decode() for x in reply]


def _refused(r: redis.Redis, reason: str, *call: object) -> None:
    with pytest.raises(redis.ResponseError) as e:
        r.evalsha(*call)  # type: ignore[arg-type]
    err = refusal(e.value)
    assert err is not None and err.reason == reason, str(e.value)


def _queue_keys(r: redis.Redis, q: str) -> set[bytes]:
    return set(r.scan_iter(match=f"slotfill:{{{q}}}:*"))


BODY = json.dumps({"prompt": "hi", "max_tokens": 3})


@pytest.mark.parametrize("job_id", ["", "a b", "x" * 129, "ü" * 4, "a\nb", "a/b", "-- x"])
def test_submit_refuses_ids_workers_cannot_use(r: redis.Redis, queue: str, job_id: str) -> None:
    _refused(r, "invalid_argument", _sha(r, "submit_job"), 7, *_submit_keys(queue, "k"),
             job_id, BODY, "")
    assert _queue_keys(r, queue) == set()


def test_submit_takes_the_longest_id(r: redis.Redis, queue: str) -> None:
    job_id = "A_-9" * 32
    assert _submit(r, queue, job_id, BODY) == ["ok", job_id]


@pytest.mark.parametrize("which,key", [
    (0, "slotfill:{Q}:stream:urgent"),      # a stream no worker reads
    (0, "slotfill:{Q}:stream:high"),        # not the body's priority
    (1, "slotfill:{Q}:job:someone-else"),   # another job's record
    (1, "slotfill:{other}:job:ID"),         # another queue's
    (2, "slotfill:{Q}:stats"),              # not an idempotency key
    (4, "slotfill:{Q}:stream:low"),         # the cap counted on the wrong streams
    (6, "slotfill:{other}:config"),         # another queue's cap
    (3, "slotfill:{bad name}:stream:high"),
])
def test_submit_refuses_keys_that_are_not_the_queues_own(r: redis.Redis, queue: str,
                                                         which: int, key: str) -> None:
    job_id = secrets.token_hex(16)
    keys = _submit_keys(queue, job_id)
    keys[which] = key.replace("{Q}", f"{{{queue}}}").replace("ID", job_id)
    _refused(r, "invalid_key", _sha(r, "submit_job"), 7, *keys, job_id, BODY, "")
    assert _queue_keys(r, queue) == set()
    assert not r.exists(key.replace("{Q}", f"{{{queue}}}").replace("ID", job_id))


def test_submit_refuses_the_old_call_shape(r: redis.Redis, queue: str) -> None:
    """The 6-key, 8-ARGV call of earlier versions (with a caller's cap and clock)."""
    job_id = secrets.token_hex(16)
    k = QueueKeys.for_queue(queue)
    _refused(r, "invalid_argument", _sha(r, "submit_job"), 6, k.stream(), k.job(job_id),
             k.idempotency("-"), *k.streams, job_id, BODY, "yesterday", 10**9, "", "", "normal",
             "")
    assert _queue_keys(r, queue) == set()


@pytest.mark.parametrize("body,reason", [
    ('{"prompt": "x", "priority": "high"}', "invalid_key"),   # sent to the normal stream
    ('{"prompt": "x", "priority": "urgent"}', "invalid_body"),
    ('{"prompt": "x", "priority": 1}', "invalid_body"),
    ('{"prompt": "x", "stream": "yes"}', "invalid_body"),
    ('{"prompt": "x", "stream": 1}', "invalid_body"),
    ('{"prompt": "x", "deadline": "yesterday"}', "invalid_body"),
    ('{"prompt": "x", "deadline": NaN}', "invalid_body"),
    ('{"prompt": "x", "deadline": Infinity}', "invalid_body"),
    ('{"prompt": "x", "deadline": 1e999}', "invalid_body"),
    ('{"prompt": "x", "deadline": -5}', "invalid_body"),
    ('["prompt", "x"]', "invalid_body"),
    ("[]", "invalid_body"),
    ('{"prompt": "x"', "invalid_body"),
    ("", "invalid_body"),
    (b'{"prompt": "\xff"}', "invalid_body"),             # not UTF-8 at all
    (b'{"prompt": "\xc0\xaf"}', "invalid_body"),         # overlong "/"
    (b'{"prompt": "\xed\xa0\x80"}', "invalid_body"),     # a surrogate, UTF-8-encoded
    (b'{"prompt": "\xf4\x90\x80\x80"}', "invalid_body"), # past U+10FFFF
    (b'{"prompt": "\xe6\x97"}', "invalid_body"),         # truncated sequence
])
def test_submit_refuses_bodies_it_cannot_take(r: redis.Redis, queue: str, body: str | bytes,
                                              reason: str) -> None:
    job_id = secrets.token_hex(16)
    _refused(r, reason, _sha(r, "submit_job"), 7, *_submit_keys(queue, job_id), job_id, body, "")
    assert _queue_keys(r, queue) == set()


def test_submit_takes_every_kind_of_utf8(r: redis.Redis, queue: str) -> None:
    job_id = secrets.token_hex(16)
    body = json.dumps({"prompt": "é 日本 😀 \U0010ffff \ud7ff"}, ensure_ascii=False)
    assert _submit(r, queue, job_id, body.encode("utf-8")) == ["ok", job_id]


@pytest.mark.parametrize("ttl", ["abc", "0", "-5", "1.5", "99999999999", " 5", "nan"])
def test_submit_refuses_bad_idempotency_ttls(r: redis.Redis, queue: str, ttl: str) -> None:
    job_id = secrets.token_hex(16)
    _refused(r, "invalid_argument", _sha(r, "submit_job"), 7,
             *_submit_keys(queue, job_id, idem="k"), job_id, BODY, ttl)
    assert _queue_keys(r, queue) == set()


def test_submit_cap_and_size_come_from_the_queues_config(r: redis.Redis, queue: str) -> None:
    k = QueueKeys.for_queue(queue)
    ids = [secrets.token_hex(16) for _ in range(3)]
    assert _submit(r, queue, ids[0], BODY)[0] == "ok"  # no config: the default cap
    r.hset(k.config, mapping={"max_pending": 2, "max_payload_bytes": 64})
    assert _submit(r, queue, ids[1], BODY)[0] == "ok"
    assert _submit(r, queue, ids[2], BODY) == ["full", "2"]  # nothing the caller sends counts
    assert not r.exists(k.job(ids[2])) and r.xlen(k.stream()) == 2
    r.hset(k.config, "max_pending", 10)
    big = json.dumps({"prompt": "x" * 100})
    _refused(r, "payload_too_large", _sha(r, "submit_job"), 7, *_submit_keys(queue, ids[2]),
             ids[2], big, "")


def test_submit_never_touches_a_job_that_exists(r: redis.Redis, queue: str) -> None:
    """A taken id (queued or finished) is answered ``exists`` and left alone: no second
    entry, no rerun, no replaced result."""
    k = QueueKeys.for_queue(queue)
    job_id = secrets.token_hex(16)
    assert _submit(r, queue, job_id, BODY) == ["ok", job_id]
    assert _submit(r, queue, job_id, BODY) == ["exists", job_id]  # queued
    assert r.xlen(k.stream()) == 1
    entry = r.hget(k.job(job_id), "entry")
    r.xdel(k.stream(), entry)  # what finishing does
    result = json.dumps({"id": job_id, "status": "succeeded", "text": "first"})
    r.hset(k.job(job_id), mapping={"status": "succeeded", "result": result})
    r.rpush(k.done(job_id), "succeeded")
    assert _submit(r, queue, job_id, json.dumps({"prompt": "again"})) == ["exists", job_id]
    assert r.xlen(k.stream()) == 0
    assert r.hget(k.job(job_id), "status") == b"succeeded"
    assert r.hget(k.job(job_id), "result") == result.encode()
    assert r.llen(k.done(job_id)) == 1


def test_submit_stamps_redis_time_and_the_bodys_deadline(r: redis.Redis, queue: str) -> None:
    k = QueueKeys.for_queue(queue)
    job_id = secrets.token_hex(16)
    sec, usec = r.time()
    server_now = sec + usec / 1e6
    deadline = server_now + 123.25
    body = json.dumps({"prompt": "x", "deadline": deadline, "stream": True})
    assert _submit(r, queue, job_id, body)[0] == "ok"
    rec = {a.decode(): b.decode() for a, b in r.hgetall(k.job(job_id)).items()}
    assert abs(float(rec["queued_at"]) - server_now) < 5
    assert float(rec["deadline"]) == deadline
    assert rec["streaming"] == "1" and rec["priority"] == "normal"


def test_submit_with_an_idempotency_key(r: redis.Redis, queue: str) -> None:
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    keys_a = _submit_keys(queue, a, idem="order-1")
    keys_b = _submit_keys(queue, b, idem="order-1")
    assert _submit(r, queue, a, BODY, "60", keys_a) == ["ok", a]
    assert _submit(r, queue, b, BODY, "60", keys_b) == ["exists", a]
    assert 0 < r.ttl(QueueKeys.for_queue(queue).idempotency("order-1")) <= 60


# -- cancel ---------------------------------------------------------------------------------


def _cancel_keys(q: str, job_id: str) -> list[str]:
    k = QueueKeys.for_queue(q)
    return [k.job(job_id), k.done(job_id), k.control, k.tokens(job_id)]


@pytest.mark.parametrize("job_id,ttl,reason", [
    ("", "60", "invalid_argument"), ("a b", "60", "invalid_argument"),
    ("x" * 129, "60", "invalid_argument"), ("ok", "sixty", "invalid_argument"),
    ("ok", "0", "invalid_argument"), ("ok", "1e3", "invalid_argument"),
])
def test_cancel_refuses_bad_arguments(r: redis.Redis, queue: str, job_id: str, ttl: str,
                                      reason: str) -> None:
    _refused(r, reason, _sha(r, "cancel_job"), 4, *_cancel_keys(queue, "ok"), job_id, ttl)


def test_cancel_refuses_foreign_keys_and_writes_the_result_itself(r: redis.Redis,
                                                                  queue: str) -> None:
    k = QueueKeys.for_queue(queue)
    job_id = secrets.token_hex(16)
    assert _submit(r, queue, job_id, BODY)[0] == "ok"
    keys = _cancel_keys(queue, job_id)
    keys[0] = k.job("other")
    _refused(r, "invalid_key", _sha(r, "cancel_job"), 4, *keys, job_id, "60")
    keys = _cancel_keys(queue, job_id)
    keys[3] = "slotfill:{elsewhere}:tokens:" + job_id
    _refused(r, "invalid_key", _sha(r, "cancel_job"), 4, *keys, job_id, "60")
    assert r.hget(k.job(job_id), "status") == b"queued"
    # The old call shape passed the result JSON: refused, not written.
    _refused(r, "invalid_argument", _sha(r, "cancel_job"), 4, *_cancel_keys(queue, job_id),
             job_id, '{"status": "succeeded", "text": "forged"}', time.time(), 60)
    assert r.evalsha(_sha(r, "cancel_job"), 4, *_cancel_keys(queue, job_id), job_id,
                     "60") == b"cancelled"
    res = json.loads(r.hget(k.job(job_id), "result"))
    assert res["id"] == job_id and res["status"] == "cancelled"
    assert res["finish_reason"] == "cancelled" and res["text"] == ""
    assert res["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert res["error"]["code"] == "cancelled" and res["error"]["retryable"] is False
    assert r.xlen(k.stream()) == 0 and 0 < r.ttl(k.job(job_id)) <= 60


# -- replay ---------------------------------------------------------------------------------


def _replay_keys(q: str, job_id: str, priority: str = "normal") -> list[str]:
    k = QueueKeys.for_queue(q)
    return [k.dead_letter, k.job(job_id), k.done(job_id), k.stream(priority), k.stats,
            *k.streams, k.tokens(job_id), k.config]


def test_replay_refuses_bad_arguments_and_foreign_keys(r: redis.Redis, queue: str) -> None:
    k = QueueKeys.for_queue(queue)
    job_id = secrets.token_hex(16)
    dead = r.xadd(k.dead_letter, {"stream": k.stream(), "entry": "1-1", "reason": "poisoned",
                                  "job": job_id, "body": BODY}).decode()
    sha = _sha(r, "replay_dead_letter")
    _refused(r, "invalid_argument", sha, 10, *_replay_keys(queue, job_id), "latest", job_id)
    _refused(r, "invalid_argument", sha, 10, *_replay_keys(queue, job_id), dead, "a b")
    keys = _replay_keys(queue, job_id)
    keys[3] = k.base + ":stream:urgent"
    _refused(r, "invalid_key", sha, 10, *keys, dead, job_id)
    keys = _replay_keys(queue, job_id)
    keys[9] = "slotfill:{elsewhere}:config"
    _refused(r, "invalid_key", sha, 10, *keys, dead, job_id)
    r.hset(k.config, "max_pending", 1)
    assert _submit(r, queue, secrets.token_hex(16), BODY)[0] == "ok"
    assert r.evalsha(sha, 10, *_replay_keys(queue, job_id), dead, job_id) == [b"full", b"1"]
    r.hset(k.config, "max_pending", 10)
    reply = r.evalsha(sha, 10, *_replay_keys(queue, job_id), dead, job_id)
    assert reply[0] == b"ok" and r.xlen(k.dead_letter) == 0
    assert r.hget(k.job(job_id), "priority") == b"normal"


# -- the Python client ----------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_client_refuses_timeouts_that_are_not_finite_and_positive(
        client: Client, r: redis.Redis, queue: str, timeout: float) -> None:
    with pytest.raises(InvalidRequest):
        client.submit("x", timeout=timeout)
    assert _queue_keys(r, queue) == set()


def test_client_timeout_is_on_redis_time(client: Client, r: redis.Redis, queue: str) -> None:
    job = client.submit("x", timeout=600)
    sec, usec = r.time()
    deadline = float(r.hget(QueueKeys.for_queue(queue).job(job.id), "deadline"))
    assert abs(deadline - (sec + usec / 1e6 + 600)) < 5


@pytest.mark.parametrize("params", [
    {"max_tokens": "10"}, {"stream": "yes"}, {"ignore_eos": "true"}, {"ignore_eos": 1},
    {"temperature": "0.5"}, {"max_tokens": 10.0}, {"seed": True}, {"logprobs": "false"},
    {"priority": 2}, {"prompt": [1, "2"]},
])
def test_client_never_coerces_types(client: Client, params: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        client.submit(**{"prompt": "x", **params})  # type: ignore[arg-type]


def test_client_maps_refusals_to_typed_errors(client: Client, queue: str) -> None:
    client.configure_queue(max_payload_bytes=1024)
    with pytest.raises(Refused) as e:
        client.submit("x" * 2000)
    assert e.value.reason == "payload_too_large" and e.value.caller_fault
    with pytest.raises(Refused) as e2:
        client.cancel("not an id")
    assert e2.value.reason == "invalid_argument"
