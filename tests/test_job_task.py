"""A claimed job's seams without Redis or an engine: the one decoder of a claim, and triage
(what a job ends with when it needs no engine)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from producer.schema import JobRequest, JobStatus
from worker.claim import ClaimedJob, ClaimError, Disposition, decode
from worker.job_task import triage
from worker.results import Outcome
from worker.settings import WorkerSettings

SETTINGS = WorkerSettings(consumer="w", max_payload_bytes=1024, max_deliveries=3)


def flat(**over: Any) -> list[Any]:
    fields: dict[str, Any] = {"stream": b"s", "entry": b"1-0", "job": b"j1",
                              "body": b'{"prompt": "hi"}', "attempts": 2, "deliveries": 3,
                              "disposition": b"run_alone", "queued_at": b"17.5"}
    fields.update(over)
    return [x for kv in fields.items() for x in kv]


def claim(disposition: Disposition = Disposition.run, body: str = '{"prompt": "hi"}'
          ) -> ClaimedJob:
    return ClaimedJob("slotfill:{q}:stream:normal", "1-0", "j1", body, 1, 4, disposition, time.time() - 1)


def test_a_claim_is_decoded_from_field_value_pairs_into_a_frozen_record() -> None:
    [c] = decode([flat()])
    assert c == ClaimedJob("s", "1-0", "j1", '{"prompt": "hi"}', 2, 3, Disposition.run_alone,
                           17.5)
    assert c.key == "j1" and c.disposition.runs
    with pytest.raises(AttributeError):
        c.disposition = Disposition.cancelled  # type: ignore[misc]
    assert c.becomes(Disposition.cancelled).disposition is Disposition.cancelled
    [m] = decode([flat(job=b"", disposition=b"malformed")])
    assert m.key == "entry:s:1-0" and not m.disposition.runs


@pytest.mark.parametrize("bad", [flat(disposition=b"solo"), flat()[:-2], flat()[:-1],
                                 flat(attempts=b"x")])
def test_a_claim_the_decoder_does_not_know_fails_loudly(bad: list[Any]) -> None:
    with pytest.raises(ClaimError):
        decode([bad])


def result(o: Outcome | JobRequest) -> dict[str, Any]:
    assert isinstance(o, Outcome)
    return dict(json.loads(o.result_json))


def test_triage_ends_jobs_that_need_no_engine() -> None:
    t0 = time.time()
    o = triage(claim(Disposition.malformed), SETTINGS, t0, t0)
    assert o == Outcome(None, "", "malformed entry: no job id")
    for d, status in ((Disposition.cancelled, JobStatus.cancelled),
                      (Disposition.expired, JobStatus.expired)):
        o = triage(claim(d), SETTINGS, t0, t0)
        assert isinstance(o, Outcome) and o.status is status and not o.dead_reason
        assert result(o)["error"]["code"] == status.value
        assert result(o)["timings"].get("started_at") is None  # it never started
    o = triage(claim(Disposition.poisoned), SETTINGS, t0, t0)
    assert isinstance(o, Outcome) and o.status is JobStatus.failed
    assert o.dead_reason == "poisoned" and result(o)["error"]["code"] == "poisoned"
    assert "delivery 4" in result(o)["error"]["message"]


def test_triage_checks_the_body_before_the_engine() -> None:
    t0 = time.time()
    for body, code in (("x" * 2000, "payload_too_large"), ("{not json", "undecodable"),
                       ('{"prompt": 5}', "invalid_request")):
        o = triage(claim(body=body), SETTINGS, t0, t0)
        assert isinstance(o, Outcome) and o.status is JobStatus.failed, body
        assert result(o)["error"]["code"] == code and result(o)["timings"]["started_at"] == t0
    o = triage(claim(body='{"prompt": "a", "deadline": 1.0}'), SETTINGS, t0, t0)
    assert isinstance(o, Outcome) and o.status is JobStatus.expired
    req = triage(claim(Disposition.run_alone), SETTINGS, t0, t0)
    assert isinstance(req, JobRequest) and req.prompt == "hi"
