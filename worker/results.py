"""Turn what happened to a job into its :class:`Outcome`: the one write that ends it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import ValidationError

from producer.errors import ErrorCode, InvalidRequest
from producer.schema import (
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    Timings,
    dump,
    parse_request_json,
)
from worker.claim import ClaimedJob
from worker.engines.base import Generation


@dataclass(frozen=True)
class Outcome:
    """How a held job ends: one result written (``finish_job``), or, for an entry that is no
    job, the entry moved to the dead-letter stream."""

    status: JobStatus | None
    """None: no job (a malformed entry): ``dead_reason`` says why it is dead-lettered."""
    result_json: str = ""
    dead_reason: str = ""
    """Non-empty: also copy the entry to the dead-letter stream."""


def callback_of(row: ClaimedJob) -> str:
    """The job's completion callback as JSON ("" for none, or for a body that is not JSON):
    it goes to the callback outbox with the result (worker/ops/celery_bridge.py)."""
    if '"callback"' not in row.body:
        return ""
    try:
        spec = json.loads(row.body).get("callback")
    except (ValueError, AttributeError):
        return ""
    return json.dumps(spec) if isinstance(spec, dict) else ""


def parse_request(row: ClaimedJob) -> JobRequest:
    """The row's body as a request; InvalidRequest (code ``undecodable`` or
    ``invalid_request``) when it is not one: not UTF-8, not JSON, a JSON type that is not
    the field's (``"10"`` for 10: no coercion), or a ``priority`` that is not its stream's."""
    try:
        raw = row.body.encode("utf-8")  # a body that was not UTF-8 kept its bytes escaped
    except UnicodeEncodeError:
        raise InvalidRequest("body: not UTF-8", ErrorCode.undecodable) from None
    try:
        req = parse_request_json(raw)
    except ValidationError as e:
        undecodable = any(err["type"] in ("json_invalid", "json_type") for err in e.errors())
        code = ErrorCode.undecodable if undecodable else ErrorCode.invalid_request
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", code) from None
    if not row.stream.endswith(f":stream:{req.priority.value}"):
        # Workers drain high first; a body that claims another level than its stream's
        # would be ordered by one and reported by the other.
        raise InvalidRequest(f"priority: {req.priority.value!r} does not match the stream "
                             f"it was added to ({row.stream})")
    return req


def timings(queued_at: float | None, started_at: float | None,
            first_token_at: float | None = None) -> Timings:
    return Timings(queued_at=queued_at, started_at=started_at, first_token_at=first_token_at,
                   finished_at=time.time())


def from_generation(row: ClaimedJob, gen: Generation, status: JobStatus, worker: str,
                    t: Timings, resumed_at: int | None = None,
                    restarted: str | None = None) -> Outcome:
    return Outcome(status, dump(JobResult(
        id=row.job_id, status=status, text=gen.text,
        token_ids=gen.token_ids if not gen.text else None,
        logprobs=gen.logprobs,  # type: ignore[arg-type]  # dicts, validated into TokenLogprob
        finish_reason=status.value if gen.aborted else gen.finish_reason,
        usage={"prompt_tokens": gen.prompt_tokens,  # type: ignore[arg-type]
               "completion_tokens": gen.completion_tokens},
        timings=t, worker=worker, attempts=row.attempts, resumed_at_token=resumed_at,
        restarted=restarted,
    )))


def failure(row: ClaimedJob, code: ErrorCode | str, message: str, worker: str, t: Timings,
            status: JobStatus = JobStatus.failed, retryable: bool = False,
            dead_reason: str = "") -> Outcome:
    return Outcome(status, dump(JobResult(
        id=row.job_id, status=status, finish_reason=status.value,
        error=JobError(code=str(getattr(code, "value", code)), message=message,
                       retryable=retryable),
        timings=t, worker=worker, attempts=row.attempts,
    )), dead_reason)


def no_job(reason: str) -> Outcome:
    """An entry without a usable job id: nothing to publish, the entry is dead-lettered."""
    return Outcome(None, dead_reason=reason)
