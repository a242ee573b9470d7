"""Pure helpers of the batched wait (``wait_jobs``, PROTOCOL.md "Reading the result"), shared
by the sync and async clients: grouping ids per shard, building the step's arguments, reading
its replies and the results popped off the waiter list."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from producer.errors import JobNotFound, WaitTimeout
from producer.keys import QueueKeys
from producer.schema import JobResult
from producer.shards import ShardLayout

REGISTER_CHUNK = 1000
"""Most jobs one ``wait_jobs`` call registers on (the step refuses more)."""

MAX_WAIT_S = 86400


def new_token() -> str:
    """A fresh waiter token: 128 random bits, hex (another client must not guess it)."""
    return secrets.token_hex(16)


def wait_seconds(timeout: float) -> int:
    """``wait_jobs``' ARGV[2]: whole seconds, one more than the wait, so the registration
    outlives the client's last block even with clock rounding."""
    return max(1, min(MAX_WAIT_S, math.ceil(max(0.0, timeout)) + 1))


def register_args(keys: QueueKeys, token: str, ids: list[str], timeout: float
                  ) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one ``wait_jobs`` call."""
    return ([keys.waiter(token), *(keys.job(i) for i in ids)],
            [token, wait_seconds(timeout), *ids])


def by_shard(layout: ShardLayout, ids: Iterable[str]) -> dict[QueueKeys, list[str]]:
    """``ids`` (deduplicated, in order) grouped by the shard their id routes to."""
    out: dict[QueueKeys, list[str]] = {}
    for i in dict.fromkeys(ids):
        out.setdefault(layout.for_job(i) if layout.sharded else layout.keys(0), []).append(i)
    return out


@dataclass
class Waiting:
    """The state of one batched wait: results got, ids still pending per shard, ids unknown."""

    token: str = field(default_factory=new_token)
    results: dict[str, JobResult] = field(default_factory=dict)
    pending: dict[QueueKeys, set[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def registered(self, keys: QueueKeys, ids: list[str], replies: list[Any]) -> None:
        """Take one ``wait_jobs`` reply: a result, 1 (registered) or 0 (no record) per id."""
        pending = self.pending.setdefault(keys, set())
        for job_id, reply in zip(ids, replies, strict=True):
            if reply == 1:
                pending.add(job_id)
                continue
            pending.discard(job_id)
            if reply == 0:
                self.unknown.append(job_id)
            else:
                self.results[job_id] = JobResult.model_validate_json(reply)

    def woken(self, keys: QueueKeys, raws: list[Any]) -> None:
        """Take the results popped off ``keys``' waiter list (each names its job)."""
        left = self.pending.setdefault(keys, set())
        for raw in raws:
            res = JobResult.model_validate_json(raw)
            if res.id in left:  # else: one taken already (it ended while registering again)
                self.results[res.id] = res
                left.discard(res.id)

    def relocations(self, layout: ShardLayout | None) -> Iterator[tuple[QueueKeys, str]]:
        """The shards to register an unknown id on next, for a sharded layout: every other
        shard in turn (a job of an older layout), until one knows it. The caller registers
        each pair it is given (one ``wait_jobs`` call) before asking for the next; ids no
        shard knows stay in ``unknown``."""
        if not self.unknown or layout is None or not layout.sharded:
            return
        lost, self.unknown = self.unknown, []
        for job_id in lost:
            for keys in layout.others(job_id):
                yield keys, job_id
                if self.unknown[-1:] != [job_id]:
                    break  # found there: registered, or its result taken
                self.unknown.pop()
            else:
                self.unknown.append(job_id)

    def not_found(self) -> JobNotFound:
        return JobNotFound(", ".join(self.unknown))

    def missing(self) -> list[str]:
        return sorted(i for ids in self.pending.values() for i in ids)

    def timed_out(self, timeout: float) -> WaitTimeout:
        missing = self.missing()
        return WaitTimeout(f"{len(missing)} job(s) not finished after {timeout}s: "
                           + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
                           missing, dict(self.results))


NAP_S = 30.0
"""How long a stream reader's registration lasts (it naps in slices of STREAM_PROBE_S)."""


@dataclass
class Nap:
    """A stream reader's registration on a job that has no token stream yet: made once per
    ``NAP_S``, so each probe costs one blocking pop, not a registration too."""

    token: str = field(default_factory=new_token)
    until: float = 0.0
    """Monotonic time the registration lasts until."""


def popped(reply: Any) -> list[Any]:
    """The elements of a ``BLMPOP`` reply (``[key, [elements]]`` or nil)."""
    return list(reply[1]) if reply else []
