"""Reading a job's token stream: the events ``Client.stream`` yields, and the rules that turn
stream entries into them (shared by the sync and async clients).

The worker appends to ``slotfill:{Q}:tokens:<id>`` (see PROTOCOL.md, Streaming):
``start`` when an attempt begins from scratch, ``moved`` when an attempt continues the
earlier one's output on another worker, ``delta`` entries with the new text, coalesced, and
``end`` with the terminal status, written in the same step as the result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from producer.schema import JobResult

FIRST_ID = "0-0"
"""Read a token stream from its beginning."""
READ_COUNT = 512
"""Entries fetched per ``XREAD``."""


@dataclass(frozen=True)
class TokenDelta:
    """New output of the current attempt. ``entry_id`` is the position to resume after
    (``Client.stream(job_id, after=entry_id)``)."""

    text: str
    token_ids: list[int]
    entry_id: str
    attempt: int
    offset: int
    """The job's tokens before this delta (a moved job's count on across the move)."""


@dataclass(frozen=True)
class Restarted:
    """The job started over (its worker died or lost the job): text yielded so far is void;
    the deltas that follow are the new attempt's, from its first token."""

    attempt: int
    entry_id: str
    worker: str


@dataclass(frozen=True)
class Moved:
    """The job continues on another worker (its worker died or lost the job) from token
    ``at``: keep the text so far; the deltas that follow are only new text."""

    attempt: int
    entry_id: str
    worker: str
    at: int


StreamEvent = TokenDelta | Restarted | Moved | JobResult
"""What ``stream`` yields: deltas, restarts, moves, and last the job's result."""


@dataclass
class StreamCursor:
    """Where one reader stands in a token stream, and which attempt it follows."""

    last_id: str = FIRST_ID
    attempt: int | None = None
    ended: bool = False
    seen_output: bool = field(default=False)

    def __post_init__(self) -> None:
        # Resuming after an id means this reader already saw something: any later ``start``
        # is an attempt it has not followed, so it must be told to drop its text.
        self.seen_output = self.last_id != FIRST_ID

    def feed(self, entry_id: str, raw: dict[Any, Any]) -> TokenDelta | Restarted | Moved | None:
        """The event of one stream entry (None: nothing to yield). Sets ``ended`` at
        ``end``; the caller then fetches the result."""
        self.last_id = entry_id
        f = {_s(k): _s(v) for k, v in raw.items()}
        kind = f.get("type")
        if kind == "end":
            self.ended = True
            return None
        attempt = int(f.get("attempt", "0") or 0)
        if kind == "start":
            restarted = self.seen_output and attempt != self.attempt
            self.attempt = attempt
            if restarted:
                return Restarted(attempt, entry_id, f.get("worker", ""))
            return None
        if kind == "moved":
            moved = self.seen_output and attempt != self.attempt
            self.attempt = attempt
            if moved:
                return Moved(attempt, entry_id, f.get("worker", ""), int(f.get("at", "0") or 0))
            return None
        if kind != "delta":
            return None  # written by a newer slotfill: skip what this reader cannot use
        if self.attempt is None:
            self.attempt = attempt  # resumed mid-attempt
        elif attempt != self.attempt:
            return None  # a late write of an attempt this stream has moved past
        self.seen_output = True
        ids = json.loads(f["ids"]) if f.get("ids") else []
        return TokenDelta(f.get("text", ""), ids, entry_id, attempt, int(f.get("offset", "0")))


def whole_result_delta(result: JobResult, cursor: StreamCursor) -> TokenDelta | None:
    """For a job that did not stream (or whose stream expired): its whole output as one
    delta, unless this reader has already seen output."""
    if cursor.seen_output or not (result.text or result.token_ids):
        return None
    return TokenDelta(result.text, list(result.token_ids or []), cursor.last_id,
                      result.attempts, 0)


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
