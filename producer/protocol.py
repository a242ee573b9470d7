"""Pure helpers shared by the sync and async clients: argument building and reply parsing."""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.exceptions import ResponseError

from producer.errors import (
    InvalidRequest,
    JobNotFound,
    PayloadTooLarge,
    QueueFull,
    RedisUnavailable,
    Refused,
)
from producer.keys import QueueKeys
from producer.redis_errors import is_transient, unavailable
from producer.schema import JobRequest, JobResult, JobStatus, dump, request_from_data
from producer.settings import ClientSettings
from producer.streaming import StreamCursor, StreamEvent, whole_result_delta


@dataclass(frozen=True)
class Job:
    """Handle of a submitted job."""

    id: str
    queue: str
    created: bool = True
    """False when an idempotency key returned an existing job."""


def new_job_id() -> str:
    """A random 128-bit id, hex."""
    return secrets.token_hex(16)


BLOCK_SLICE_S = 4.0
"""Longest single blocking wait when the connection's socket timeout is unknown."""


def block_slice(left: float, connection_kwargs: dict[str, Any]) -> float:
    """Seconds one blocking command (``BLMPOP`` in ``wait``) may block: what is left of the
    wait, but shorter than the connection's socket timeout, or the read times out first
    (redis-py 8 gives every connection a 5 s socket timeout unless told otherwise)."""
    timeout = (connection_kwargs.get("socket_timeout")
               or connection_kwargs.get("orig_socket_timeout"))
    cap = 0.8 * float(timeout) if timeout else BLOCK_SLICE_S
    return max(0.01, min(left, max(0.1, cap)))


def queue_keys(queue: str) -> QueueKeys:
    """Key names of ``queue``; InvalidRequest for a name that cannot be a queue."""
    try:
        return QueueKeys.for_queue(queue)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def build_request(
    request: JobRequest | dict[str, Any] | None,
    params: dict[str, Any],
    timeout: float | None,
    server_now: float | None = None,
) -> JobRequest:
    """The validated request. ``timeout`` (seconds, finite, > 0) becomes the body's
    ``deadline`` on the Redis server's clock: ``server_now`` is its ``TIME`` (deadlines are
    only ever compared with Redis' clock, never a worker's or a client's)."""
    try:
        if isinstance(request, JobRequest) and not params:
            req = request
        else:
            data = (request.model_dump(mode="json", exclude_none=True)
                    if isinstance(request, JobRequest) else dict(request or {}))
            req = request_from_data({**data, **params})
    except ValidationError as e:
        raise InvalidRequest(_describe(e)) from None
    except ValueError as e:
        raise InvalidRequest(f"invalid request: {e}") from None
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise InvalidRequest("timeout must be a finite number of seconds > 0")
        now = server_now if server_now is not None else time.time()
        req = req.model_copy(update={"deadline": now + timeout})
    return req


def server_time(reply: Any) -> float:
    """Unix seconds from a ``TIME`` reply (seconds, microseconds)."""
    sec, usec = reply
    return int(sec) + int(usec) / 1e6


def _describe(e: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
             for err in e.errors()]
    return "invalid request: " + "; ".join(parts)


def submit_call(
    keys: QueueKeys,
    settings: ClientSettings,
    req: JobRequest,
    idempotency_key: str | None,
    job_id: str | None = None,
) -> tuple[list[str], list[str | int | float]]:
    """KEYS and ARGV of ``submit_job`` for one validated request. The step itself reads the
    priority, ``stream`` and ``deadline`` from the body and the cap from the queue's config.
    ``job_id``: minted by the caller (a sharded queue's routing, producer/shards.py)."""
    body = dump(req)
    size = len(body.encode("utf-8"))
    if size > settings.max_payload_bytes:
        raise PayloadTooLarge(size, settings.max_payload_bytes)
    if idempotency_key is not None and not (0 < len(idempotency_key) <= 256):
        raise InvalidRequest("idempotency_key must be 1..256 characters")
    job_id = job_id or new_job_id()
    key_list = [
        keys.stream(req.priority),
        keys.job(job_id),
        keys.idempotency(idempotency_key or "-"),
        *keys.streams,
        keys.config,
    ]
    # "waiters": this client waits with wait_jobs, so the job needs no done list.
    args: list[str | int | float] = [
        job_id, body, settings.idempotency_ttl if idempotency_key else "", "waiters"]
    return key_list, args


def parse_submit(reply: list[Any], queue: str) -> Job:
    kind, value = (_s(x) for x in reply)
    if kind == "full":
        raise QueueFull(f"queue {queue!r} holds {value} unfinished jobs, its cap")
    return Job(id=value, queue=queue, created=kind == "ok")


REFUSAL = re.compile(r"^(?:ERR )?slotfill:(\w+) (.*)$", re.S)


def refusal(e: ResponseError) -> Refused | None:
    """The typed error for a Lua step's refusal (``ERR slotfill:<reason> <what>``), or None
    for any other Redis error."""
    m = REFUSAL.match(str(e))
    return Refused(m.group(1), m.group(2)) if m else None


def submit_calls(
    keys: QueueKeys, settings: ClientSettings, requests: Iterable[JobRequest | dict[str, Any]]
) -> list[tuple[list[str], list[str | int | float]]]:
    """Validate every request before any is sent, so a bad one refuses the whole batch."""
    return [submit_call(keys, settings, build_request(r, {}, None), None) for r in requests]


def parse_submit_many(replies: list[Any], queue: str) -> list[str | None]:
    out: list[str | None] = []
    for reply in replies:
        if isinstance(reply, ResponseError):  # one call of a batched script refused or failed
            # A Redis condition inside the batch (OOM, READONLY, ...) is the same retryable
            # outage as when it fails a whole call.
            raise refusal(reply) or (unavailable(reply) if is_transient(reply) else reply)
        try:
            out.append(parse_submit(reply, queue).id)
        except QueueFull:
            out.append(None)
    return out


def raise_if_refused(accepted: list[str | None], total: int, queue: str) -> None:
    refused = sum(1 for i in accepted if i is None)
    if refused:
        raise QueueFull(
            f"queue {queue!r} is full: {refused} of {len(accepted)} sent refused, "
            f"{total - len(accepted)} not sent",
            accepted=accepted,
        )


def check_replicated(acks: Any, wanted: int) -> None:
    """After ``WAIT``: fewer replicas than wanted hold the write, so it could vanish in a
    failover and must not be acknowledged."""
    if int(acks) < wanted:
        raise RedisUnavailable(f"submit reached {int(acks)} of {wanted} replicas in time; "
                               "it may or may not be kept", "NOREPLICAS")


def cancel_keys(keys: QueueKeys, job_id: str) -> list[str]:
    """KEYS of ``cancel_job``."""
    return [keys.job(job_id), keys.done(job_id), keys.control, keys.tokens(job_id)]


def parse_status(raw: Any) -> JobStatus | None:
    return None if raw is None else JobStatus(_s(raw))


def parse_result(raw: Any) -> JobResult | None:
    return None if raw is None else JobResult.model_validate_json(raw)


STREAM_PROBE_S = 0.5
"""How long a reader of a job that has no token stream yet waits on its waiter list before it
looks again (a job added with a plain ``XADD`` gets its stream only when it starts)."""


def stream_probe(job_id: str, status: Any, streaming: Any, stream_exists: Any) -> str:
    """What a token-stream reader does next, from the job's record: ``read`` its stream,
    ``wait`` (nothing streams yet: block on a waiter list), or take the ``result`` (the job
    ended without streaming, or its stream expired). JobNotFound for an unknown job."""
    st = parse_status(status)
    if st is None:
        raise JobNotFound(job_id)
    if streaming and (stream_exists or not st.terminal):
        return "read"
    return "result" if st.terminal else "wait"


def whole_result(result: JobResult, cursor: StreamCursor) -> list[StreamEvent]:
    delta = whole_result_delta(result, cursor)
    return [result] if delta is None else [delta, result]


def stream_entries(reply: Any) -> list[tuple[str, dict[Any, Any]]]:
    """``(entry id, fields)`` of an ``XREAD`` reply on one stream (RESP2 or RESP3 shape)."""
    if not reply:
        return []
    per_stream = reply.values() if isinstance(reply, dict) else [e for _k, e in reply]
    out: list[tuple[str, dict[Any, Any]]] = []
    for entries in per_stream:
        if entries and isinstance(entries[0], list) and entries[0] and isinstance(
                entries[0][0], list):
            entries = entries[0]  # RESP3 wraps the entries once more
        out.extend((_s(entry_id), dict(fields)) for entry_id, fields in entries)
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def loads(raw: str | bytes) -> Any:
    return json.loads(raw)
