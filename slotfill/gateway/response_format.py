"""The Responses API's objects and events, built from a job's record, result and token stream.

Event sequence numbers are a pure function of the job's token stream (which lives in Redis),
so any instance that replays the stream numbers the events the same way: a client resumes
with ``starting_after=N`` on whichever instance its load balancer picks.
"""

from __future__ import annotations

from typing import Any

from producer.errors import InvalidRequest
from producer.keys import Priority
from producer.schema import JobRequest, JobResult, JobStatus
from slotfill.cli.batch_format import to_request
from slotfill.gateway.convert import CHAT
from slotfill.gateway.errors import bad_request, param_of

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
          "background", "stream", "metadata", "store", "user"}
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def job_request(body: dict[str, Any], priority: Priority) -> JobRequest:
    messages: list[dict[str, str]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    inp = body.get("input")
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        messages.extend(_message(item, i) for i, item in enumerate(inp))
    else:
        raise bad_request("input: a string or a list of messages", param="input")
    job: dict[str, Any] = {"messages": messages}
    if body.get("max_output_tokens") is not None:
        job["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "model"):
        if body.get(name) is not None:
            job[name] = body[name]
    try:
        req = to_request(CHAT, job, priority)
    except InvalidRequest as e:
        raise bad_request(str(e), param=param_of(str(e))) from None
    # Always a streaming job: its token stream is what any instance replays and resumes.
    return req.model_copy(update={"stream": True})


def _message(item: Any, i: int) -> dict[str, str]:
    if not isinstance(item, dict) or item.get("type", "message") != "message" \
            or item.get("role") not in ROLES:
        raise bad_request(f"input[{i}]: only messages (role user, assistant, system, developer)",
                          param=f"input[{i}]")
    content = item.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                   for p in content):
            raise bad_request(f"input[{i}].content: only text parts", param=f"input[{i}]")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise bad_request(f"input[{i}].content: text", param=f"input[{i}]")
    return {"role": ROLES[item["role"]], "content": content}


def response_id(job_id: str) -> str:
    return "resp_" + job_id


def job_of(resp_id: str) -> str | None:
    job = resp_id.removeprefix("resp_")
    return job if job != resp_id and job.isalnum() else None


def message_item(job_id: str, text: str, status: str) -> dict[str, Any]:
    content = [] if status == "in_progress" and not text else [_part(text)]
    return {"id": "msg_" + job_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(job_id: str, meta: dict[str, Any], status: JobStatus,
                    res: JobResult | None) -> dict[str, Any]:
    state = {"queued": "queued", "running": "in_progress", "succeeded": "completed",
             "failed": "failed", "expired": "failed", "cancelled": "cancelled"}[status.value]
    incomplete = None
    if res is not None and res.ok and res.finish_reason == "length":
        state, incomplete = "incomplete", {"reason": "max_output_tokens"}
    error = None
    if res is not None and res.status in (JobStatus.failed, JobStatus.expired):
        error = {"code": "server_error", "message": res.error.message if res.error
                 else res.status.value}
    output = []
    usage = None
    if res is not None and res.ok:
        output = [message_item(job_id, res.text, "incomplete" if incomplete else "completed")]
        usage = {"input_tokens": res.usage.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": res.usage.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": res.usage.total_tokens}
    return {
        "id": response_id(job_id), "object": "response", "created_at": meta["created_at"],
        "status": state, "background": meta.get("background", False), "error": error,
        "incomplete_details": incomplete, "instructions": meta.get("instructions"),
        "max_output_tokens": meta.get("max_output_tokens"), "model": meta.get("model"),
        "output": output, "parallel_tool_calls": False, "temperature": meta.get("temperature"),
        "top_p": meta.get("top_p"), "tool_choice": "auto", "tools": [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "usage": usage,
        "metadata": meta.get("metadata") or {}, "store": True,
    }


class EventNumberer:
    """Numbers events in the one order every instance produces them."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.item_id = "msg_" + job_id
        self.seq = -1

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def opening(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response={**response, "status": "queued"
                                                     if response["status"] == "queued"
                                                     else "in_progress", "output": []}),
            self.event("response.in_progress", response={**response, "status": "in_progress",
                                                         "output": []}),
            self.event("response.output_item.added", output_index=0,
                       item=message_item(self.job_id, "", "in_progress")),
            self.event("response.content_part.added", item_id=self.item_id, output_index=0,
                       content_index=0, part=_part("")),
        ]

    def delta(self, text: str) -> dict[str, Any]:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0,
                          content_index=0, delta=text, logprobs=[])

    def restarted(self, attempt: int) -> dict[str, Any]:
        """Not an OpenAI event: the worker died and the job started over; drop the text."""
        return self.event("response.slotfill.restarted", item_id=self.item_id, attempt=attempt)

    def closing(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        if response["output"]:
            item = response["output"][0]
            text = item["content"][0]["text"]
            out += [
                self.event("response.output_text.done", item_id=self.item_id, output_index=0,
                           content_index=0, text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=self.item_id,
                           output_index=0, content_index=0, part=_part(text)),
                self.event("response.output_item.done", output_index=0, item=item),
            ]
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed")
        out.append(self.event(kind, response=response))
        return out
