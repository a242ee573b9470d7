"""OpenAI request bodies to slotfill jobs and job results to OpenAI objects, reusing the
batch-file conversion (:mod:`slotfill.cli.batch_format`) so the HTTP API and batch files
accept and answer exactly the same requests."""

from __future__ import annotations

import time
from typing import Any

from producer.errors import InvalidRequest
from producer.keys import Priority
from producer.schema import JobRequest, JobResult
from slotfill.cli.batch_format import Line, output_line, to_request
from slotfill.gateway.errors import bad_request, param_of

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

GATEWAY_ONLY = ("stream", "stream_options")
"""Fields the gateway handles itself; the rest must be valid job fields."""
REFUSED = ("priority", "callback", "deadline")
"""Job fields an HTTP caller may not set: priority comes from the API key, Celery callbacks
and deadlines are for trusted backends (``request_timeout`` bounds a request instead)."""


def job_request(url: str, body: dict[str, Any], priority: Priority) -> JobRequest:
    """The job for one chat or completions body (400 on anything the job schema refuses,
    unknown fields included)."""
    b = {k: v for k, v in body.items() if k not in GATEWAY_ONLY}
    for name in REFUSED:
        if name in b:
            raise bad_request(f"{name}: not accepted through the gateway", param=name,
                              code="unknown_parameter")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    if url == CHAT and isinstance(b.get("messages"), list):
        # OpenAI's newer name for the system role.
        b["messages"] = [{**m, "role": "system"} if isinstance(m, dict)
                         and m.get("role") == "developer" else m for m in b["messages"]]
    try:
        req = to_request(url, b, priority)
    except InvalidRequest as e:
        raise bad_request(str(e), param=param_of(str(e))) from None
    return req.model_copy(update={"stream": bool(body.get("stream"))})


def completion_object(url: str, body: dict[str, Any], res: JobResult) -> dict[str, Any]:
    """The ``chat.completion`` or ``text_completion`` object of a succeeded job."""
    _ok, line = output_line(Line(0, "", url, body), res)
    obj: dict[str, Any] = line["response"]["body"]
    return obj


def include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


class ChunkMaker:
    """OpenAI's streaming chunks (``chat.completion.chunk`` / ``text_completion``) of a job."""

    def __init__(self, url: str, job_id: str, model: str) -> None:
        self.chat = url == CHAT
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{job_id}"
        self.model = model
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def first(self) -> dict[str, Any] | None:
        if not self.chat:
            return None
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def delta(self, text: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None,
                                 "finish_reason": None}])
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def last(self, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                 "finish_reason": finish_reason}])
        return self._chunk([{"index": 0, "text": "", "logprobs": None,
                             "finish_reason": finish_reason}])

    def usage(self, res: JobResult) -> dict[str, Any]:
        return self._chunk([], usage={"prompt_tokens": res.usage.prompt_tokens,
                                      "completion_tokens": res.usage.completion_tokens,
                                      "total_tokens": res.usage.total_tokens})
