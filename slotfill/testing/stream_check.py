"""The exactness invariant, checked over every job of a queue (fault tests and soaks).

PROTOCOL.md promises: every job has exactly one visible result, and for a streaming job that
result equals the concatenation of the deltas since the stream's last ``start`` (across any
``moved``: a job that continued elsewhere keeps its text, and each move comes exactly after
the tokens the stream holds: nothing repeated, nothing lost). :func:`check_jobs` reads each
job back with plain Redis commands and lists what breaks that promise, job by job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.keys import QueueKeys
from slotfill.testing import signals


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@dataclass
class StreamView:
    """What a reader of a job's token stream ends up with."""

    attempt: str | None = None
    """The attempt named by the last ``start`` or ``moved``."""
    text: str = ""
    ids: list[int] = field(default_factory=list)
    ended: bool = False
    problems: list[str] = field(default_factory=list)


def read_stream(r: redis.Redis, key: str) -> StreamView:
    v = StreamView()
    for _entry, raw in r.xrange(key) or []:
        f = {_s(k): _s(val) for k, val in (raw or {}).items()}
        kind = f.get("type")
        if kind == "start":
            v.attempt, v.text, v.ids, v.ended = f.get("attempt"), "", [], False
        elif kind == "moved":
            if v.ended:
                v.problems.append("moved after end")
            if v.attempt is not None and int(f.get("at", -1)) != len(v.ids):
                v.problems.append(f"moved at token {f.get('at')} after {len(v.ids)} tokens")
            v.attempt = f.get("attempt")
        elif kind == "delta":
            if v.ended:
                v.problems.append("delta after end")
            if f.get("attempt") != v.attempt:
                v.problems.append(f"delta of attempt {f.get('attempt')} after start {v.attempt}")
                continue
            if int(f.get("offset", -1)) != len(v.ids):
                v.problems.append(f"delta at offset {f.get('offset')} after {len(v.ids)} tokens")
            v.text += f.get("text", "")
            v.ids += json.loads(f["ids"]) if f.get("ids") else []
        elif kind == "end":
            if v.ended:
                v.problems.append("two ends")
            v.ended = True
    return v


@dataclass
class JobReport:
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    """Job id -> what is wrong with it."""
    attempts: dict[str, int] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)
    mismatched_streams: int = 0
    """Streaming jobs whose stream does not join to their result."""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_job(r: redis.Redis, keys: QueueKeys, job_id: str, streaming: bool) -> list[str]:
    """What breaks the invariant for one job (empty: nothing)."""
    raw, notify, waiters = r.hmget(keys.job(job_id), *signals.fields(["result"]))
    if raw is None:
        return ["no result"]
    res = json.loads(raw)
    out = []
    bad = signals.problem(job_id, notify, waiters, int(r.llen(keys.done(job_id))),
                          signals.pushes(r, keys, None), None)
    if bad:
        out.append(bad)
    if not streaming:
        return out
    v = read_stream(r, keys.tokens(job_id))
    out += v.problems
    if v.attempt is None:
        if res.get("usage", {}).get("completion_tokens"):
            out.append("output in the result, no start in the stream")
        return out
    if not v.ended:
        out.append("stream has no end")
    if v.attempt != str(res.get("attempts")):
        out.append(f"result of attempt {res.get('attempts')}, stream's last start {v.attempt}")
    if res.get("text") or not res.get("token_ids"):
        if v.text != res.get("text", ""):
            out.append(f"stream joins to {len(v.text)} chars, result has "
                       f"{len(res.get('text', ''))}")
    elif v.ids != res["token_ids"]:
        out.append(f"stream has {len(v.ids)} token ids, result {len(res['token_ids'])}")
    return out


def check_jobs(r: redis.Redis, queue: str, job_ids: Iterable[str],
               streaming: bool = True) -> JobReport:
    keys = QueueKeys.for_queue(queue)
    rep = JobReport()
    for job_id in job_ids:
        rep.checked += 1
        problems = check_job(r, keys, job_id, streaming)
        if problems:
            rep.problems[job_id] = problems
            if any("stream" in p or "delta" in p for p in problems):
                rep.mismatched_streams += 1
        h = r.hmget(keys.job(job_id), "attempts", "worker")
        rep.attempts[job_id] = int(h[0] or 0)
        rep.workers[job_id] = _s(h[1] or b"")
    return rep
