"""``/v1/batches``: create, retrieve, list, cancel (see :mod:`slotfill.gateway.batch_run`)."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request

from slotfill.cli.batch_format import URLS, BatchFileError
from slotfill.gateway import batch_run
from slotfill.gateway.errors import bad_request, not_found
from slotfill.gateway.files import file_content
from slotfill.gateway.state import Gateway, gateway, json_body, reject_unknown, tenant, text

router = APIRouter()

FIELDS = {"input_file_id", "endpoint", "completion_window", "metadata",
          "output_expires_after"}


@router.post("/v1/batches")
async def create(request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    body = await json_body(request)
    reject_unknown(body, FIELDS)
    file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    if not isinstance(file_id, str):
        raise bad_request("input_file_id: required", param="input_file_id")
    if endpoint not in URLS:
        raise bad_request(f"endpoint: one of {', '.join(URLS)}", param="endpoint")
    if body.get("completion_window", "24h") != "24h":
        raise bad_request("completion_window: only '24h'", param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise bad_request("metadata: an object of strings", param="metadata")
    content = await file_content(gw, who.queue, file_id)
    try:
        lines = await batch_run.parse_lines(content, str(endpoint), who.batch_priority,
                                            gw.client_settings.max_payload_bytes)
    except BatchFileError as e:
        raise bad_request(f"input file {file_id}: {e}", param="input_file_id") from None
    if not lines:
        raise bad_request(f"input file {file_id} has no requests", param="input_file_id")
    batch_id = batch_run.new_batch_id()
    await batch_run.create(gw, who.queue, batch_id, {
        "endpoint": endpoint, "input_file_id": file_id, "completion_window": "24h",
        "metadata": json.dumps(metadata), "priority": who.batch_priority.value,
        "total": len(lines)})
    await batch_run.pump(gw, who.queue, batch_id)
    return await _object(gw, who.queue, batch_id)


@router.get("/v1/batches/{batch_id}")
async def retrieve(batch_id: str, request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    await _known(gw, who.queue, batch_id)
    await batch_run.pump(gw, who.queue, batch_id)
    return await _object(gw, who.queue, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel(batch_id: str, request: Request) -> Any:
    gw, who = gateway(request), tenant(request)
    m = await _known(gw, who.queue, batch_id)
    if m["status"] not in batch_run.TERMINAL and m["status"] != "cancelling":
        await batch_run.set_meta(gw, who.queue, batch_id, status="cancelling",
                                 cancelling_at=int(time.time()))
        await gw.redis.sadd(gw.keys(who.queue).active_batches, batch_id)
        await batch_run.pump(gw, who.queue, batch_id)
    return await _object(gw, who.queue, batch_id)


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Any:
    gw, who = gateway(request), tenant(request)
    limit = max(1, min(limit, 100))
    ids = [text(x) for x in await gw.redis.zrevrange(gw.keys(who.queue).q.batches, 0, -1)]
    if after is not None:
        ids = ids[ids.index(after) + 1:] if after in ids else []
    data: list[dict[str, Any]] = []
    for b in ids:
        if len(data) > limit:
            break
        m = await batch_run.meta(gw, who.queue, b)
        if m.get("kind") == "gateway":  # not the CLI's batches of the same queue
            data.append(render(b, m))
    more = len(data) > limit
    data = data[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


async def _known(gw: Gateway, queue: str, batch_id: str) -> dict[str, str]:
    m = await batch_run.meta(gw, queue, batch_id)
    if m.get("kind") != "gateway":
        raise not_found("batch", batch_id)
    return m


async def _object(gw: Gateway, queue: str, batch_id: str) -> dict[str, Any]:
    return render(batch_id, await _known(gw, queue, batch_id))


def render(batch_id: str, m: dict[str, str]) -> dict[str, Any]:
    def t(name: str) -> int | None:
        return int(m[name]) if m.get(name) else None

    created = int(m["created_at"])
    errors = json.loads(m["errors"]) if m.get("errors") else None
    return {
        "id": batch_id, "object": "batch", "endpoint": m["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": m["input_file_id"], "completion_window": m["completion_window"],
        "status": m["status"], "output_file_id": m.get("output_file_id"),
        "error_file_id": m.get("error_file_id"), "created_at": created,
        "in_progress_at": t("in_progress_at"), "expires_at": created + batch_run.WINDOW_S,
        "finalizing_at": t("finalizing_at"), "completed_at": t("completed_at"),
        "failed_at": t("failed_at"), "expired_at": t("expired_at"),
        "cancelling_at": t("cancelling_at"), "cancelled_at": t("cancelled_at"),
        "request_counts": {"total": int(m.get("total", "0")),
                           "completed": int(m.get("completed", "0")),
                           "failed": int(m.get("failed", "0"))},
        "metadata": json.loads(m.get("metadata") or "null"),
    }
