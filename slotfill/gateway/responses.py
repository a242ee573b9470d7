"""``/v1/responses``: create (foreground, streaming or ``background``), retrieve (poll or
resume the event stream with ``starting_after``), cancel."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from producer import JobResult, Restarted, TokenDelta, WaitTimeout
from producer.errors import JobNotFound
from producer.schema import JobStatus
from slotfill.gateway import jobs
from slotfill.gateway import response_format as rf
from slotfill.gateway.errors import APIError, bad_request, not_found
from slotfill.gateway.state import Gateway, Tenant, gateway, json_body, reject_unknown, tenant

router = APIRouter()


@router.post("/v1/responses")
async def create(request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    body = await json_body(request)
    reject_unknown(body, rf.FIELDS)
    background, stream = bool(body.get("background")), bool(body.get("stream"))
    if background and body.get("store") is False:
        raise bad_request("background responses need store: true", param="store")
    req = rf.job_request(body, who.priority)
    job = await jobs.submit(gw, who, req)
    meta = {"created_at": int(time.time()), "background": background,
            "model": body.get("model"), "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "metadata": body.get("metadata")}
    await gw.redis.set(who.keys.response(job.id), json.dumps(meta),
                       ex=gw.client_settings.result_ttl)
    if stream:
        return _sse(gw, who, job.id, meta, -1, cancel_on_exit=not background)
    if background:
        return rf.response_object(job.id, meta, JobStatus.queued, None)
    res = await jobs.wait(gw, who, job, request)
    return rf.response_object(job.id, meta, res.status, res)


@router.get("/v1/responses/{resp_id}")
async def retrieve(resp_id: str, request: Request, stream: bool = False,
                   starting_after: int = -1) -> Any:
    gw, who = gateway(request), tenant(request)
    job_id, meta = await _known(gw, who, resp_id)
    if stream:
        # A reader that resumes never cancels: the job was not started by this request.
        return _sse(gw, who, job_id, meta, starting_after, cancel_on_exit=False)
    return await _current(gw, who, job_id, meta)


@router.post("/v1/responses/{resp_id}/cancel")
async def cancel(resp_id: str, request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    job_id, meta = await _known(gw, who, resp_id)
    if not meta.get("background"):
        raise bad_request("only background responses can be cancelled")
    if await gw.client.cancel(job_id, queue=who.queue) == "requested":
        # Running: the worker aborts it within an engine step; answer with the outcome.
        try:
            await gw.client.wait(job_id, timeout=5.0, queue=who.queue)
        except WaitTimeout:
            pass
    return await _current(gw, who, job_id, meta)


async def _known(gw: Gateway, who: Tenant, resp_id: str) -> tuple[str, dict[str, Any]]:
    job_id = rf.job_of(resp_id)
    raw = None if job_id is None else await gw.redis.get(who.keys.response(job_id))
    if job_id is None or raw is None:
        raise not_found("response", resp_id)
    meta: dict[str, Any] = json.loads(raw)
    return job_id, meta


async def _current(gw: Gateway, who: Tenant, job_id: str,
                   meta: dict[str, Any]) -> dict[str, Any]:
    try:
        status = await gw.client.status(job_id, queue=who.queue)
    except JobNotFound:
        raise APIError(404, f"response resp_{job_id} expired", code="not_found") from None
    res = await gw.client.result(job_id, queue=who.queue) if status.terminal else None
    return rf.response_object(job_id, meta, status, res)


def _sse(gw: Gateway, who: Tenant, job_id: str, meta: dict[str, Any], after: int,
         cancel_on_exit: bool) -> StreamingResponse:
    return StreamingResponse(_events(gw, who, job_id, meta, after, cancel_on_exit),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(gw: Gateway, who: Tenant, job_id: str, meta: dict[str, Any], after: int,
                  cancel_on_exit: bool) -> AsyncIterator[bytes]:
    """Replay the job's token stream from its start as numbered events, sending those after
    ``after``. Replaying (rather than remembering where each client was) is what lets any
    instance resume any stream."""
    ev = rf.EventNumberer(job_id)
    finished = False
    try:
        opening = rf.response_object(job_id, meta, JobStatus.queued, None)
        for first in ev.opening(opening):
            if first["sequence_number"] > after:
                yield _frame(first)
        async for item in gw.client.stream(job_id, queue=who.queue,
                                           timeout=gw.settings.request_timeout):
            e: dict[str, Any] | None = None
            if isinstance(item, TokenDelta) and item.text:
                e = ev.delta(item.text)
            elif isinstance(item, Restarted):
                e = ev.restarted(item.attempt)
            elif isinstance(item, JobResult):
                finished = True
                final = rf.response_object(job_id, meta, item.status, item)
                for e2 in ev.closing(final):
                    if e2["sequence_number"] > after:
                        yield _frame(e2)
            if e is not None and e["sequence_number"] > after:
                yield _frame(e)
    except WaitTimeout:
        yield _frame(ev.event("error", code="timeout", message="no result within "
                              f"{gw.settings.request_timeout}s", param=None))
    except JobNotFound:
        yield _frame(ev.event("error", code="not_found", message="the response expired",
                              param=None))
    finally:
        if cancel_on_exit and not finished:
            gw.abandon(job_id, who.queue)


def _frame(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
