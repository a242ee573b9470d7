"""OpenAI batches on slotfill's batch machinery, advanced by whichever instance gets there.

A batch is the ``slotfill batch`` bookkeeping in Redis (the queue's ``batch`` hash, its
``custom_id → job id`` hash, the ``batches`` index) plus the OpenAI fields. Its lines are
parsed and converted by :mod:`slotfill.cli.batch_format` and submitted with the same
idempotency keys as ``slotfill batch``, so no line ever runs twice, whichever instance
submits it and however often. :func:`pump` (under a short per-batch lease) submits what the
queue refused (backpressure), cancels on request, and once every job is finished writes the
output and error files (deterministic ids: two instances finalizing at once write the same).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from producer import protocol, shards
from producer.keys import Priority
from producer.schema import JobResult, JobStatus
from producer.scripts import source
from slotfill.cli.batch_format import Line, idempotency_key, invalid_line, output_line, read_input
from slotfill.gateway.files import file_content, write_file
from slotfill.gateway.state import Gateway, text

WINDOW_S = 86_400
SUBMIT_CHUNK = 500
LEASE_MS = 30_000
TERMINAL = ("completed", "failed", "expired", "cancelled")


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


async def parse_lines(content: bytes, endpoint: str, priority: Priority,
                      max_payload: int) -> list[Line]:
    """The file's lines (BatchFileError for a file that is not a batch file); lines for
    another endpoint become error lines, as OpenAI requires one endpoint per batch."""
    def parse() -> list[Line]:
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
            f.write(content)
            f.flush()
            return read_input(Path(f.name), priority, max_payload)

    lines = await asyncio.to_thread(parse)
    for line in lines:
        if line.url != endpoint:
            line.request, line.error = None, f"url {line.url} differs from the batch's {endpoint}"
    return lines


async def meta(gw: Gateway, queue: str, batch_id: str) -> dict[str, str]:
    raw = await gw.redis.hgetall(gw.keys(queue).q.batch(batch_id))
    return {text(k): text(v) for k, v in raw.items()}


async def set_meta(gw: Gateway, queue: str, batch_id: str, **fields: Any) -> None:
    k = gw.keys(queue).q
    pipe = gw.redis.pipeline(transaction=False)
    pipe.hset(k.batch(batch_id), mapping={a: str(b) for a, b in fields.items()})
    pipe.expire(k.batch(batch_id), gw.client_settings.batch_ttl)
    pipe.expire(k.batch_jobs(batch_id), gw.client_settings.batch_ttl)
    await pipe.execute()


async def create(gw: Gateway, queue: str, batch_id: str, fields: dict[str, Any]) -> None:
    k = gw.keys(queue)
    now = time.time()
    await set_meta(gw, queue, batch_id, kind="gateway", created_at=int(now),
                   in_progress_at=int(now), status="in_progress", **fields)
    pipe = gw.redis.pipeline(transaction=False)
    pipe.zadd(k.q.batches, {batch_id: now})
    pipe.sadd(k.active_batches, batch_id)
    await pipe.execute()


async def pump(gw: Gateway, queue: str, batch_id: str) -> None:
    """Advance one batch, if no other instance is doing so right now."""
    k = gw.keys(queue)
    token = secrets.token_hex(8)
    if not await gw.redis.set(k.batch_lock(batch_id), token, nx=True, px=LEASE_MS):
        return
    try:
        await _advance(gw, queue, batch_id)
    finally:
        if await gw.redis.get(k.batch_lock(batch_id)) == token.encode():
            await gw.redis.delete(k.batch_lock(batch_id))


async def pump_active(gw: Gateway) -> None:
    for queue in gw.settings.queues(gw.client_settings.queue):
        for raw in await gw.redis.smembers(gw.keys(queue).active_batches):
            await pump(gw, queue, text(raw))


async def _advance(gw: Gateway, queue: str, batch_id: str) -> None:
    m = await meta(gw, queue, batch_id)
    if m.get("status") in TERMINAL or not m:
        await gw.redis.srem(gw.keys(queue).active_batches, batch_id)
        return
    if m["status"] == "in_progress" and time.time() > int(m["created_at"]) + WINDOW_S:
        await set_meta(gw, queue, batch_id, status="cancelling", expiring="1",
                       cancelling_at=int(time.time()))
        m["status"] = "cancelling"
    lines: list[Line] | None = None
    if m["status"] == "in_progress" and m.get("submitted_all") != "1":
        try:
            content = await file_content(gw, queue, m["input_file_id"])
        except Exception:
            await _finish(gw, queue, batch_id, m, None, failed="the input file was deleted "
                          "before every line was submitted")
            return
        lines = await parse_lines(content, m["endpoint"], Priority(m["priority"]),
                                  gw.client_settings.max_payload_bytes)
        await _submit_missing(gw, queue, batch_id, lines)
        m = await meta(gw, queue, batch_id)
    jobs = await _jobs(gw, queue, batch_id)
    statuses = await _statuses(gw, queue, list(jobs.values()))
    if m["status"] == "cancelling":
        for job, st in zip(jobs.values(), statuses, strict=True):
            if st is not None and not st.terminal:
                await gw.client.cancel(job, queue=queue)
        statuses = await _statuses(gw, queue, list(jobs.values()))
    done = all(st is None or st.terminal for st in statuses)
    await set_meta(gw, queue, batch_id,
                   completed=sum(st is JobStatus.succeeded for st in statuses),
                   failed=int(m.get("invalid", "0")) + sum(
                       st is None or (st.terminal and st is not JobStatus.succeeded)
                       for st in statuses))
    if done and (m["status"] == "cancelling" or m.get("submitted_all") == "1"):
        await _finish(gw, queue, batch_id, m, lines)


async def _submit_missing(gw: Gateway, queue: str, batch_id: str, lines: list[Line]) -> None:
    k = gw.keys(queue).q
    known = await _jobs(gw, queue, batch_id)
    todo = [ln for ln in lines if ln.request is not None and ln.custom_id not in known]
    script = gw.redis.register_script(source("submit_job"))
    layout = await shards.read_layout_async(gw.redis, queue)  # each line by its key
    refused = False
    for start in range(0, len(todo), SUBMIT_CHUNK):
        chunk = todo[start:start + SUBMIT_CHUNK]
        pipe = gw.redis.pipeline(transaction=False)
        for line in chunk:
            assert line.request is not None
            _, (key_list, args) = shards.submit_call(
                layout, gw.client_settings, line.request,
                idempotency_key(batch_id, line.custom_id))
            await script(keys=key_list, args=args, client=pipe)
        accepted = {}
        for line, reply in zip(chunk, await pipe.execute(), strict=True):
            kind, value = (x.decode() if isinstance(x, bytes) else str(x) for x in reply)
            if kind == "full":
                refused = True
            else:
                accepted[line.custom_id] = value
        if accepted:
            await gw.redis.hset(k.batch_jobs(batch_id), mapping=accepted)  # type: ignore[arg-type]
        if refused:
            break  # the queue is full: the next pump tries again
    invalid = sum(1 for ln in lines if ln.request is None)
    fields: dict[str, Any] = {"total": len(lines), "invalid": invalid}
    if not refused:
        fields["submitted_all"] = "1"
    await set_meta(gw, queue, batch_id, **fields)


async def _jobs(gw: Gateway, queue: str, batch_id: str) -> dict[str, str]:
    raw = await gw.redis.hgetall(gw.keys(queue).q.batch_jobs(batch_id))
    return {text(a): text(b) for a, b in raw.items()}


async def _statuses(gw: Gateway, queue: str, job_ids: list[str]) -> list[JobStatus | None]:
    layout = await shards.read_layout_async(gw.redis, queue)
    out: list[JobStatus | None] = []
    for start in range(0, len(job_ids), 1000):
        pipe = gw.redis.pipeline(transaction=False)
        for job in job_ids[start:start + 1000]:
            pipe.hget(layout.for_job(job).job(job), "status")
        out.extend(protocol.parse_status(s) for s in await pipe.execute())
    return out


async def _finish(gw: Gateway, queue: str, batch_id: str, m: dict[str, str],
                  lines: list[Line] | None, failed: str = "") -> None:
    """Write the output and error files and the final status."""
    now = int(time.time())
    if failed:
        await set_meta(gw, queue, batch_id, status="failed", failed_at=now,
                       errors=json.dumps([{"code": "input_file_deleted", "message": failed}]))
        await gw.redis.srem(gw.keys(queue).active_batches, batch_id)
        return
    if lines is None:
        try:
            content = await file_content(gw, queue, m["input_file_id"])
            lines = await parse_lines(content, m["endpoint"], Priority(m["priority"]),
                                      gw.client_settings.max_payload_bytes)
        except Exception:
            lines = []  # input gone: output lines name the custom_id, no request body
    ok_lines, err_lines = await _output(gw, queue, batch_id, m["endpoint"], lines)
    fields: dict[str, Any] = {"finalizing_at": now}
    if ok_lines:
        fields["output_file_id"] = (await write_file(
            gw, queue, f"file-{batch_id}-output", f"{batch_id}_output.jsonl", "batch_output",
            "".join(ok_lines).encode()))["id"]
    if err_lines:
        fields["error_file_id"] = (await write_file(
            gw, queue, f"file-{batch_id}-errors", f"{batch_id}_error.jsonl", "batch_output",
            "".join(err_lines).encode()))["id"]
    if m["status"] == "cancelling":
        final = "expired" if m.get("expiring") == "1" else "cancelled"
    else:
        final = "completed"
    fields.update({"status": final, f"{final}_at": now})
    await set_meta(gw, queue, batch_id, **fields)
    await gw.redis.srem(gw.keys(queue).active_batches, batch_id)


async def _output(gw: Gateway, queue: str, batch_id: str, endpoint: str,
                  lines: list[Line]) -> tuple[list[str], list[str]]:
    layout = await shards.read_layout_async(gw.redis, queue)
    jobs = await _jobs(gw, queue, batch_id)
    by_id = {ln.custom_id: ln for ln in lines}
    ok_lines: list[str] = []
    err_lines: list[str] = [json.dumps(invalid_line(ln)) + "\n" for ln in lines
                            if ln.request is None]
    items = list(jobs.items())
    for start in range(0, len(items), 1000):
        pipe = gw.redis.pipeline(transaction=False)
        for _cid, job in items[start:start + 1000]:
            pipe.hget(layout.for_job(job).job(job), "result")
        for (cid, job), raw in zip(items[start:start + 1000], await pipe.execute(), strict=True):
            line = by_id.get(cid) or Line(0, cid, endpoint, {})
            if raw is None:
                err_lines.append(json.dumps({
                    "id": f"batch_req_{job}", "custom_id": cid, "response": None,
                    "error": {"code": "result_expired", "message": "the job's result expired "
                              "before the batch was finalized"}}) + "\n")
                continue
            ok, obj = output_line(line, JobResult.model_validate_json(raw))
            (ok_lines if ok else err_lines).append(json.dumps(obj, ensure_ascii=False) + "\n")
    if lines:  # lines never submitted (cancelled first) get an error line too
        for ln in lines:
            if ln.request is not None and ln.custom_id not in jobs:
                err_lines.append(json.dumps({
                    "id": f"batch_req_{batch_id}_{ln.n}", "custom_id": ln.custom_id,
                    "response": None,
                    "error": {"code": "batch_cancelled", "message": "never submitted: the "
                              "batch was cancelled or expired first"}}) + "\n")
    return ok_lines, err_lines
