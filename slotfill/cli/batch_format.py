"""OpenAI Batch API file format: input lines to job requests, results to output lines."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from producer.errors import InvalidRequest, PayloadTooLarge
from producer.keys import Priority
from producer.schema import JobRequest, JobResult, JobStatus, dump, request_from_data

URLS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}


class BatchFileError(ValueError):
    """The input file is not a batch file; nothing was submitted."""


@dataclass
class Line:
    n: int
    custom_id: str
    url: str
    body: dict[str, Any]
    request: JobRequest | None = None
    error: str = ""




# -- input ---------------------------------------------------------------------------------

def to_request(url: str, body: dict[str, Any], priority: Priority) -> JobRequest:
    """An OpenAI request body as a slotfill job. Raises InvalidRequest."""
    b = dict(body)
    if b.pop("stream", False):
        raise InvalidRequest("stream: not supported in a batch")
    b.pop("user", None)
    if "max_completion_tokens" in b:
        b.setdefault("max_tokens", b.pop("max_completion_tokens"))
    if url == "/v1/completions":
        if isinstance(b.get("logprobs"), int) and not isinstance(b["logprobs"], bool):
            # Completions take ``logprobs: n`` (candidates per token); jobs take chat's shape.
            n = b.pop("logprobs")
            b.update(logprobs=True, top_logprobs=n)
        if "messages" in b:
            raise InvalidRequest("messages: use /v1/chat/completions for chat requests")
        if isinstance(b.get("prompt"), list) and b["prompt"] and isinstance(b["prompt"][0], str):
            if len(b["prompt"]) != 1:
                raise InvalidRequest("prompt: one prompt per line (a list of prompts is not "
                                     "supported)")
            b["prompt"] = b["prompt"][0]
    else:
        if "prompt" in b:
            raise InvalidRequest("prompt: use /v1/completions for plain prompts")
        msgs = b.get("messages")
        if isinstance(msgs, list):
            b["messages"] = [_flatten_message(m) for m in msgs]
    b.setdefault("priority", priority.value)
    try:
        return request_from_data(b)  # strict: JSON's own types, as the wire takes them
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise InvalidRequest(f"{where}: {err['msg']}") from None
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


def _flatten_message(m: Any) -> Any:
    """Chat content given as text parts becomes one string; other parts are refused.
    OpenAI's ``developer`` role is its newer name for ``system``; a participant ``name`` is
    dropped (chat templates have no place for it)."""
    if not isinstance(m, dict):
        return m
    m = {k: v for k, v in m.items() if k != "name"}
    if m.get("role") == "developer":
        m["role"] = "system"
    if isinstance(m.get("content"), list):
        parts = m["content"]
        if all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            return {**m, "content": "".join(str(p.get("text", "")) for p in parts)}
    return m


def read_input(path: Path, priority: Priority = Priority.low,
               max_payload_bytes: int | None = None) -> list[Line]:
    """Parse and check the whole file first; raises BatchFileError naming the bad lines.
    Lines whose request is invalid are kept with ``error`` set (they get error lines)."""
    lines: list[Line] = []
    problems: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                problems.append(f"line {n}: not JSON ({e})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"line {n}: not a JSON object")
                continue
            cid, method, url, body = (obj.get(k) for k in ("custom_id", "method", "url", "body"))
            if not isinstance(cid, str) or not cid:
                problems.append(f"line {n}: custom_id must be a non-empty string")
            elif cid in seen:
                problems.append(f"line {n}: duplicate custom_id {cid!r}")
            elif method != "POST":
                problems.append(f"line {n}: method must be POST")
            elif url not in URLS:
                problems.append(f"line {n}: url must be one of {', '.join(URLS)}")
            elif not isinstance(body, dict):
                problems.append(f"line {n}: body must be an object")
            else:
                seen.add(cid)
                line = Line(n, cid, url, body)
                try:
                    line.request = to_request(url, body, priority)
                    size = len(dump(line.request).encode("utf-8"))
                    if max_payload_bytes is not None and size > max_payload_bytes:
                        line.request = None
                        line.error = str(PayloadTooLarge(size, max_payload_bytes))
                except InvalidRequest as e:
                    line.error = str(e)
                lines.append(line)
            if len(problems) >= 20:
                break
    if problems:
        raise BatchFileError("\n".join(problems))
    return lines


# -- output --------------------------------------------------------------------------------

def _completion_body(line: Line, res: JobResult, model: str | None) -> dict[str, Any]:
    usage = {"prompt_tokens": res.usage.prompt_tokens,
             "completion_tokens": res.usage.completion_tokens,
             "total_tokens": res.usage.total_tokens}
    created = int(res.timings.finished_at or time.time())
    # The model that ran it where known (a worker serves one model, whatever was asked).
    model = model or str(line.body.get("model") or "slotfill")
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": res.finish_reason}
    if line.url == "/v1/completions":
        choice["text"] = res.text
        body = {"id": f"cmpl-{res.id}", "object": "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": usage}
    else:
        choice["message"] = {"role": "assistant", "content": res.text}
        body = {"id": f"chatcmpl-{res.id}", "object": "chat.completion", "created": created,
                "model": model, "choices": [choice], "usage": usage}
    if res.token_ids is not None:
        choice["token_ids"] = res.token_ids
    if res.logprobs is not None:
        choice["logprobs"] = _logprobs(line.url, res)
    return body


def _logprobs(url: str, res: JobResult) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice: chat's ``content`` list, or completions' parallel
    lists (``text_offset`` counts characters of the tokens' text)."""
    toks = res.logprobs or []
    if url != "/v1/completions":
        return {"content": [t.model_dump(exclude_none=True) for t in toks]}
    offsets, at = [], 0
    for t in toks:
        offsets.append(at)
        at += len(t.token or "")
    return {"tokens": [t.token for t in toks], "token_logprobs": [t.logprob for t in toks],
            "top_logprobs": [{str(c.token): c.logprob for c in t.top_logprobs} for t in toks],
            "text_offset": offsets}


def _error_body(message: str, code: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def output_line(line: Line, res: JobResult,
                model: str | None = None) -> tuple[bool, dict[str, Any]]:
    """(succeeded?, the OpenAI-shaped line) for one finished job; ``model``: the model of
    the worker that ran it (default: the one the request named)."""
    base: dict[str, Any] = {"id": f"batch_req_{res.id}", "custom_id": line.custom_id}
    if res.status is JobStatus.succeeded:
        return True, {**base, "response": {"status_code": 200, "request_id": res.id,
                                           "body": _completion_body(line, res, model)}, "error": None}
    if res.status is JobStatus.failed and res.error is not None:
        caller = res.error.code in ("invalid_request", "prompt_too_long", "undecodable",
                                    "payload_too_large", "unknown_adapter")
        status_code, kind = (400, "invalid_request_error") if caller else (500, "server_error")
        return False, {**base, "response": {
            "status_code": status_code, "request_id": res.id,
            "body": _error_body(res.error.message, res.error.code, kind)}, "error": None}
    message = res.error.message if res.error else f"job {res.status.value}"
    return False, {**base, "response": None,
                   "error": {"code": res.status.value, "message": message}}


def invalid_line(line: Line) -> dict[str, Any]:
    h = hashlib.sha256(line.custom_id.encode()).hexdigest()[:32]
    return {"id": f"batch_req_{h}", "custom_id": line.custom_id,
            "response": {"status_code": 400, "request_id": None,
                         "body": _error_body(line.error, "invalid_request",
                                             "invalid_request_error")},
            "error": None}


def done_custom_ids(path: Path) -> set[str]:
    """custom_ids already written to an output file; cuts a torn (unterminated) last line."""
    if not path.exists():
        return set()
    done: set[str] = set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
        for raw in data[:end].splitlines():
            try:
                cid = json.loads(raw).get("custom_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(cid, str):
                done.add(cid)
    return done


def default_batch_id(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "batch_" + h.hexdigest()[:24]


def idempotency_key(batch_id: str, custom_id: str) -> str:
    return f"batch:{batch_id}:{hashlib.sha256(custom_id.encode()).hexdigest()[:32]}"


def errors_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".errors" + (out.suffix or ".jsonl"))
