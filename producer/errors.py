"""Typed errors. Each says whether retrying can help and whose fault it is."""

from __future__ import annotations

from enum import Enum
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError


class ErrorCode(str, Enum):
    """Codes carried in a failed job's result (``error.code``)."""

    invalid_request = "invalid_request"
    """The request is malformed or its parameters are invalid. Caller's fault."""
    prompt_too_long = "prompt_too_long"
    """The prompt plus ``max_tokens`` does not fit ``max_model_len``. Caller's fault."""
    undecodable = "undecodable"
    """The stream entry is not a job (bad JSON, wrong encoding, missing fields). Caller's fault."""
    payload_too_large = "payload_too_large"
    unknown_adapter = "unknown_adapter"
    """The job names a LoRA adapter this worker does not have (or runs without LoRA).
    Caller's fault."""
    poisoned = "poisoned"
    """Delivered more often than the limit allows; moved to the dead-letter stream."""
    engine_error = "engine_error"
    """The engine raised for this request alone. Retryable."""
    cancelled = "cancelled"
    expired = "expired"


class SlotfillError(Exception):
    """Base of every slotfill error."""

    retryable: bool = False
    caller_fault: bool = False
    engine_dead: bool = False


class InvalidRequest(SlotfillError, ValueError):
    """The request cannot run as given; fix it before resubmitting."""

    caller_fault = True

    def __init__(self, message: str, code: ErrorCode = ErrorCode.invalid_request) -> None:
        super().__init__(message)
        self.code = code


class PayloadTooLarge(InvalidRequest):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload is {size} bytes, over the {limit}-byte limit", ErrorCode.payload_too_large
        )


class Refused(InvalidRequest):
    """A Lua step refused its arguments (its reply was ``ERR slotfill:<reason> <what>``):
    a malformed id, a key that is not the queue's own, a body it cannot take. Nothing was
    written. Caller's fault."""

    def __init__(self, reason: str, message: str) -> None:
        code = ErrorCode.payload_too_large if reason == "payload_too_large" else (
            ErrorCode.invalid_request)
        super().__init__(f"{reason}: {message}", code)
        self.reason = reason
        """``invalid_argument``, ``invalid_key``, ``invalid_body`` or ``payload_too_large``."""


class QueueFull(SlotfillError):
    """The queue holds its maximum number of unfinished jobs. Retry later (backpressure)."""

    retryable = True

    def __init__(self, message: str, accepted: list[str | None] | None = None) -> None:
        super().__init__(message)
        self.accepted = accepted
        """For ``submit_many``: each request's job id in input order, None where refused."""


class JobNotFound(SlotfillError, KeyError):
    """No record of this job id (never submitted, or its result expired)."""

    caller_fault = True


class WaitTimeout(SlotfillError, TimeoutError):
    """The job did not finish within the wait's timeout; it may still finish later.

    From ``wait_many``: ``missing`` lists the ids not finished, ``results`` holds those that
    were (both empty from ``wait``)."""

    retryable = True

    def __init__(self, message: str, missing: list[str] | None = None,
                 results: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.results = results or {}


class EngineDead(SlotfillError):
    """The inference engine died or hung; the worker exits and its jobs are reclaimed."""

    engine_dead = True
    retryable = True


class RedisUnavailable(SlotfillError, RedisConnectionError):
    """Redis cannot serve the request right now: unreachable, stalled past the socket
    timeout, failing over (READONLY, MASTERDOWN, CLUSTERDOWN, TRYAGAIN), waiting for its
    replicas (NOREPLICAS), loading, busy, or out of memory (OOM). Retry with backoff.

    A ``submit`` that raised this may or may not have been stored (the reply was lost):
    resubmit with the same ``idempotency_key`` to be sure of exactly one job. ``code`` is
    Redis' error code (``READONLY``, ``OOM``...), or "" for a lost connection or timeout.
    Also a ``redis.ConnectionError``, so code that caught those keeps working."""

    retryable = True

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
