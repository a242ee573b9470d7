"""``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from producer import JobResult, Restarted, TokenDelta, WaitTimeout
from slotfill.gateway import jobs
from slotfill.gateway.convert import (
    CHAT,
    COMPLETIONS,
    ChunkMaker,
    completion_object,
    include_usage,
    job_request,
)
from slotfill.gateway.errors import error_body, for_result, not_found
from slotfill.gateway.state import Gateway, Tenant, gateway, json_body, tenant

router = APIRouter()


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _complete(request, CHAT)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _complete(request, COMPLETIONS)


async def _complete(request: Request, url: str) -> Any:
    gw, who = gateway(request), tenant(request)
    body = await json_body(request)
    req = job_request(url, body, who.priority)
    job = await jobs.submit(gw, who, req)
    if req.stream:
        return StreamingResponse(_stream(gw, who, job.id, url, body),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Slotfill-Job": job.id})
    res = await jobs.wait(gw, who, job, request)
    if not res.ok:
        raise for_result(res)
    return JSONResponse(completion_object(url, body, res), headers={"X-Slotfill-Job": job.id})


async def _stream(gw: Gateway, who: Tenant, job_id: str, url: str,
                  body: dict[str, Any]) -> AsyncIterator[bytes]:
    """The job's token stream as OpenAI chunks. Whatever ends this early (the client gone,
    a timeout, a restart after text was sent) cancels the job: nobody reads it any more."""
    chunks = ChunkMaker(url, job_id, str(body.get("model") or "slotfill"))
    finished, sent = False, False
    try:
        first = chunks.first()
        if first is not None:
            yield sse(first)
        async for ev in gw.client.stream(job_id, queue=who.queue,
                                         timeout=gw.settings.request_timeout):
            if isinstance(ev, TokenDelta) and ev.text:
                sent = True
                yield sse(chunks.delta(ev.text))
            elif isinstance(ev, Restarted) and sent:
                # OpenAI's chunks cannot take text back: end with an error, not wrong text.
                yield sse(error_body("the worker running this request died after part of "
                                     "the answer was sent; retry", "server_error", "restarted"))
                return
            elif isinstance(ev, JobResult):
                finished = True
                if not ev.ok:
                    err = for_result(ev)
                    yield sse(err.body())
                    return
                yield sse(chunks.last(ev.finish_reason))
                if include_usage(body):
                    yield sse(chunks.usage(ev))
                yield sse("[DONE]")
    except WaitTimeout:
        yield sse(error_body(f"no result within {gw.settings.request_timeout}s; the job was "
                             "cancelled", "server_error", "timeout"))
    finally:
        if not finished:
            gw.abandon(job_id, who.queue)


@router.get("/v1/models")
async def list_models(request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    return {"object": "list", "data": await _models(gw, who)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    for m in await _models(gw, who):
        if m["id"] == model_id:
            return m
    raise not_found("model", model_id)


async def _models(gw: Gateway, who: Tenant) -> list[dict[str, Any]]:
    """The models of the live workers of the caller's queue (their heartbeats)."""
    names = [k async for k in gw.redis.scan_iter(match=who.keys.q.worker_pattern(), count=1000)]
    if not names:
        return []
    pipe = gw.redis.pipeline(transaction=False)
    for k in names:
        pipe.hmget(k, "model", "started_at")
    found: dict[str, int] = {}
    for model, started in await pipe.execute():
        if started is None:
            continue  # expired between SCAN and HMGET
        name = (model or b"").decode() or "tiny"
        t = int(float(started))
        found[name] = min(found.get(name, t), t)
    return [{"id": name, "object": "model", "created": t, "owned_by": "slotfill"}
            for name, t in sorted(found.items())]
