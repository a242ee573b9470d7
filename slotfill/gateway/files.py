"""``/v1/files``: batch input files and the batches' output and error files, kept in Redis.

Each file is one hash (``GatewayKeys.file``: ``meta`` = the OpenAI file object as JSON,
``content`` = the bytes) that expires ``file_ttl`` seconds after it was written; uploads are
limited to ``max_file_bytes``. Files belong to the queue of the key that wrote them.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from producer.connection import is_cluster
from slotfill.gateway.errors import bad_request, not_found
from slotfill.gateway.state import Gateway, gateway, tenant

router = APIRouter()

PURPOSES = ("batch", "batch_output")


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


async def write_file(gw: Gateway, queue: str, file_id: str, filename: str, purpose: str,
                     content: bytes) -> dict[str, Any]:
    now = int(time.time())
    ttl = gw.settings.file_ttl
    meta = {"id": file_id, "object": "file", "bytes": len(content), "created_at": now,
            "expires_at": now + ttl, "filename": filename, "purpose": purpose,
            "status": "processed", "status_details": None}
    key = gw.keys(queue).file(file_id)
    # MULTI keeps the file from outliving its TTL on a plain server; on a cluster, where
    # redis-py's asyncio MULTI pipeline blocks the event loop (worker/store.py, heartbeat),
    # the two commands go in one plain pipeline, in order on one connection.
    pipe = gw.redis.pipeline(transaction=not is_cluster(gw.redis))
    pipe.hset(key, mapping={"meta": json.dumps(meta), "content": content})
    pipe.expire(key, ttl)
    await pipe.execute()
    return meta


async def file_meta(gw: Gateway, queue: str, file_id: str) -> dict[str, Any]:
    raw = await gw.redis.hget(gw.keys(queue).file(file_id), "meta")
    if raw is None:
        raise not_found("file", file_id)
    meta: dict[str, Any] = json.loads(raw)
    return meta


async def file_content(gw: Gateway, queue: str, file_id: str) -> bytes:
    raw = await gw.redis.hget(gw.keys(queue).file(file_id), "content")
    if raw is None:
        raise not_found("file", file_id)
    return raw if isinstance(raw, bytes) else raw.encode()


@router.post("/v1/files")
async def upload(request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("upload the file as multipart/form-data (fields: file, purpose)")
    form = await request.form(max_part_size=gw.settings.max_file_bytes)
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise bad_request("file: missing", param="file")
    if purpose != "batch":
        raise bad_request("purpose: only 'batch' is supported", param="purpose")
    content = await upload.read()
    await form.close()
    return await write_file(gw, who.queue, new_file_id(), upload.filename or "upload.jsonl",
                            purpose, content)


@router.get("/v1/files/{file_id}")
async def retrieve(file_id: str, request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    return await file_meta(gw, who.queue, file_id)


@router.get("/v1/files/{file_id}/content")
async def content(file_id: str, request: Request) -> Response:
    gw, who = gateway(request), tenant(request)
    return Response(await file_content(gw, who.queue, file_id),
                    media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete(file_id: str, request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    if not await gw.redis.delete(gw.keys(who.queue).file(file_id)):
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
