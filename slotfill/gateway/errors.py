"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the status
code OpenAI's SDKs map to their exception classes."""

from __future__ import annotations

from typing import Any

from producer.schema import JobResult, JobStatus

CALLER_CODES = frozenset({"invalid_request", "prompt_too_long", "undecodable",
                          "payload_too_large", "unknown_adapter"})


class APIError(Exception):
    """Raised anywhere in a request; the app turns it into the JSON error response."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.code, self.param)


def error_body(message: str, kind: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(what: str, ident: str) -> APIError:
    return APIError(404, f"no {what} with id {ident!r}", code="not_found")


def unavailable(message: str = "the queue's Redis is unreachable; retry shortly") -> APIError:
    return APIError(503, message, kind="server_error", code="redis_unavailable",
                    headers={"Retry-After": "1"})


def queue_full(message: str, retry_after: int) -> APIError:
    return APIError(429, message, kind="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def for_result(res: JobResult) -> APIError:
    """The error a non-streaming request answers with when its job did not succeed."""
    err = res.error
    if res.status is JobStatus.failed and err is not None:
        if err.code in CALLER_CODES:
            return APIError(400, err.message, code=err.code)
        return APIError(500, err.message, kind="server_error", code=err.code)
    if res.status is JobStatus.expired:
        return APIError(504, err.message if err else "the job passed its deadline",
                        kind="server_error", code="expired")
    return APIError(409, "the job was cancelled", code="cancelled")


def param_of(message: str) -> str | None:
    """The field a slotfill validation message names (``"max_tokens: ..."``), if any."""
    head = message.removeprefix("invalid request: ").split(":", 1)[0].strip()
    return head if head and " " not in head else None
