"""Pure validation logic (no Redis)."""

from __future__ import annotations

import math

import pytest

from producer import InvalidRequest, JobRequest, PayloadTooLarge, QueueKeys
from producer.protocol import build_request, new_job_id, submit_call
from producer.settings import ClientSettings

BAD_REQUESTS = {
    "no input": {"max_tokens": 4},
    "both inputs": {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    "empty prompt": {"prompt": ""},
    "negative max_tokens": {"prompt": "a", "max_tokens": -1},
    "zero max_tokens": {"prompt": "a", "max_tokens": 0},
    "huge max_tokens": {"prompt": "a", "max_tokens": 10**9},
    "NaN temperature": {"prompt": "a", "temperature": math.nan},
    "inf top_p": {"prompt": "a", "top_p": math.inf},
    "temperature out of range": {"prompt": "a", "temperature": 7},
    "wrong type": {"prompt": "a", "max_tokens": "many"},
    "unknown field": {"prompt": "a", "best_of": 3},
    "n > 1": {"prompt": "a", "n": 2},
    "bad stop": {"prompt": "a", "stop": [""]},
    "too many stops": {"prompt": "a", "stop": ["x"] * 40},
    "bad role": {"messages": [{"role": "robot", "content": "hi"}]},
    "empty messages": {"messages": []},
    "negative token id": {"prompt": [1, -5]},
    "min_tokens over max": {"prompt": "a", "max_tokens": 2, "min_tokens": 5},
    "bad priority": {"prompt": "a", "priority": "urgent"},
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_raise_invalid_request(name: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        build_request(BAD_REQUESTS[name], {}, None)
    assert e.value.caller_fault and not e.value.retryable
    assert str(e.value).startswith("invalid request:")


def test_good_request_round_trips_as_json() -> None:
    req = build_request({"messages": [{"role": "user", "content": "hi"}]},
                        {"max_tokens": 5, "stop": "x"}, timeout=10)
    again = JobRequest.model_validate_json(req.model_dump_json())
    assert again == req and again.stop == ["x"] and again.deadline is not None


def test_payload_limit_is_checked_at_submit() -> None:
    settings = ClientSettings(max_payload_bytes=1024)
    req = build_request({"prompt": "x" * 5000}, {}, None)
    with pytest.raises(PayloadTooLarge):
        submit_call(QueueKeys.for_queue("q"), settings, req, None)


def test_job_ids_are_random_128_bit() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_keys_share_the_queue_hash_tag() -> None:
    k = QueueKeys.for_queue("emails")
    names = [*k.streams, k.job("x"), k.done("x"), k.idempotency("i"), k.dead_letter, k.stats]
    assert all("{emails}" in n for n in names)
    with pytest.raises(ValueError):
        QueueKeys.for_queue("bad name with spaces")
