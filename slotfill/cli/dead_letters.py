"""The dead-letter streams of a queue (``slotfill dlq``): each shard of a sharded queue has
its own (producer/shards.py); these read them all as one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError

from producer.keys import Priority, QueueKeys
from producer.protocol import new_job_id
from producer.queue_stats import entry_time
from producer.schema import JobRequest
from producer.scripts import source
from producer.shards import read_layout

_ENTRY_ID = re.compile(r"^\d+-\d+$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


@dataclass
class DeadLetter:
    id: str
    """The dead-letter stream entry id."""
    fields: dict[str, str]

    @property
    def job(self) -> str:
        return self.fields.get("job", "")

    @property
    def stream(self) -> str:
        return self.fields.get("stream", "")

    @property
    def priority(self) -> str:
        return self.stream.rsplit(":", 1)[-1]

    @property
    def at(self) -> float:
        try:
            return float(self.fields.get("at", ""))
        except ValueError:
            return entry_time(self.id) or 0.0


@dataclass
class Replay:
    dead_id: str
    outcome: str
    """``ok`` | ``missing`` | ``mismatch`` | ``active`` | ``full`` | ``invalid``."""
    job: str = ""
    detail: str = ""


class DeadLetters:
    """The dead-letter streams of one queue, every shard's (producer/shards.py): list, show,
    replay. Each dead letter stays on its shard; a replay puts it back there."""

    def __init__(self, r: redis.Redis, queue: str) -> None:
        self.r = r
        self.keys = QueueKeys.for_queue(queue)
        try:
            self.shards = read_layout(r, queue).every_keys
        except ValueError:
            self.shards = [self.keys]
        self._replay = r.register_script(source("replay_dead_letter"))

    def shard_of(self, d: DeadLetter) -> QueueKeys:
        """The shard whose dead-letter stream holds ``d`` (the one its stream names)."""
        return next((k for k in self.shards if d.stream.startswith(k.base + ":stream:")),
                    self.keys)

    def entries(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit``, over every shard (by entry time)."""
        found = [d for k in self.shards
                 for d in _letters(self.r.xrange(k.dead_letter, count=limit))]
        return sorted(found, key=lambda d: _entry_order(d.id))[:limit]

    def size(self) -> int:
        return sum(int(self.r.xlen(k.dead_letter)) for k in self.shards)

    def pages(self) -> Iterator[list[DeadLetter]]:
        for k in self.shards:
            yield from _scan_ids(self.r, k.dead_letter)

    def get(self, ident: str) -> DeadLetter | None:
        """By dead-letter entry id, or by job id (the newest dead letter of that job)."""
        if _ENTRY_ID.match(ident):
            for k in self.shards:
                found = _letters(self.r.xrange(k.dead_letter, min=ident, max=ident))
                if found:
                    return found[0]
            return None
        last = None
        for page in self.pages():
            for d in page:
                if d.job == ident and (last is None or _entry_order(d.id) > _entry_order(
                        last.id)):
                    last = d
        return last

    def replay(self, d: DeadLetter) -> Replay:
        """Put the dead letter's body back on its stream as a fresh entry, same job id."""
        keys = self.shard_of(d)
        if not d.stream.startswith(keys.base + ":stream:"):
            return Replay(d.id, "invalid", d.job, f"stream {d.stream!r} is not this queue's")
        try:
            Priority(d.priority)
        except ValueError:
            return Replay(d.id, "invalid", d.job, f"unknown stream {d.stream!r}")
        try:
            JobRequest.model_validate_json(d.fields.get("body", ""))
        except ValidationError as e:
            # A worker would only fail it again (undecodable): the body needs a person.
            first = e.errors()[0]
            return Replay(d.id, "invalid", d.job, f"body is not a job request ({first['msg']}):"
                          " fix it and submit it as a new job (`dlq show` prints it)")
        job = d.job or new_job_id()
        if not _JOB_ID.match(job):
            return Replay(d.id, "invalid", job, "job id not usable")
        reply = self._replay(
            keys=[keys.dead_letter, keys.job(job), keys.done(job), d.stream, keys.stats,
                  *keys.streams, keys.tokens(job), keys.config],
            args=[d.id, job],
        )
        outcome, detail = _s(reply[0]), _s(reply[1])
        if outcome == "ok":
            return Replay(d.id, "ok", job, _s(reply[2]))
        return Replay(d.id, outcome, job, detail)


def _letters(raw: Any) -> list[DeadLetter]:
    return [DeadLetter(_s(i), {_s(k): _s(v) for k, v in (f or {}).items()}) for i, f in raw or []]


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms or 0), int(seq or 0))


def _scan_ids(r: redis.Redis, stream: str, page: int = 500) -> Iterator[list[DeadLetter]]:
    start = "-"
    while True:
        letters = _letters(r.xrange(stream, min=start, count=page))
        if not letters:
            return
        yield letters
        if len(letters) < page:
            return
        start = "(" + letters[-1].id
