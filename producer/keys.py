"""Every Redis key and stream name slotfill uses, in one place.

All keys of one queue share the hash tag ``{<queue>}`` so that each Lua step, which touches a
job's record and its queue's streams together, stays inside one Redis Cluster slot. A logical
queue split into shards (producer/shards.py) is N such queues, each on its own slot: these
key names are those of one shard, named like a queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

PREFIX = "slotfill"
GROUP = "workers"
"""Consumer group every worker of a queue joins."""

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class Priority(str, Enum):
    high = "high"
    normal = "normal"
    low = "low"


PRIORITIES: tuple[Priority, ...] = (Priority.high, Priority.normal, Priority.low)
"""Pull order: a worker drains ``high`` before ``normal`` before ``low``."""


def valid_queue_name(name: str) -> bool:
    return bool(_QUEUE_NAME.match(name))


@dataclass(frozen=True)
class QueueKeys:
    """Key names of one queue. Construct with :meth:`for_queue`."""

    queue: str

    @classmethod
    def for_queue(cls, queue: str) -> QueueKeys:
        if not valid_queue_name(queue):
            raise ValueError(f"queue name must match {_QUEUE_NAME.pattern!r}, got {queue!r}")
        return cls(queue)

    @property
    def base(self) -> str:
        return f"{PREFIX}:{{{self.queue}}}"

    def stream(self, priority: Priority | str = Priority.normal) -> str:
        """The job stream of one priority level (entries: ``id``, ``body``)."""
        return f"{self.base}:stream:{Priority(priority).value}"

    @property
    def streams(self) -> list[str]:
        return [self.stream(p) for p in PRIORITIES]

    def job(self, job_id: str) -> str:
        """Hash holding a job's state, timings and, once terminal, its result."""
        return f"{self.base}:job:{job_id}"

    def done(self, job_id: str) -> str:
        """List that gets one element when the job is terminal, for jobs whose record lacks
        ``notify=waiters`` (plain ``XADD``, ``submit_job`` without its ARGV[4]): clients of the
        earlier protocol block on it."""
        return f"{self.base}:done:{job_id}"

    def waiter(self, token: str) -> str:
        """List of one waiting client (``wait_jobs``): the terminal steps push the result of
        each job it registered on; expires a minute after its wait."""
        return f"{self.base}:waiter:{token}"

    def tokens(self, job_id: str) -> str:
        """Stream of a streaming job's output: ``start`` (an attempt begins), ``delta``
        (coalesced new text of that attempt), ``end`` (terminal status). Capped, with a TTL."""
        return f"{self.base}:tokens:{job_id}"

    def checkpoint(self, job_id: str) -> str:
        """String of the generated token ids a running job has so far (``"id,"`` items, in
        order), whatever attempt made them: a reclaiming worker continues from it. Written
        with the token stream (``append_tokens``); expires with the result."""
        return f"{self.base}:ckpt:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.base}:idem:{key}"

    @property
    def dead_letter(self) -> str:
        """Stream of entries that failed delivery too often or could not be parsed."""
        return f"{self.base}:dead"

    @property
    def control(self) -> str:
        """Pub/Sub channel: cancellations of running jobs."""
        return f"{self.base}:control"

    @property
    def callbacks(self) -> str:
        """Sorted set of jobs whose completion callback is not yet known to be sent, scored by
        when any worker may (re)send it (the job record keeps the ``callback`` spec)."""
        return f"{self.base}:callbacks"

    @property
    def config(self) -> str:
        """Hash of the queue's own limits (``max_pending``, ``max_payload_bytes``), read by
        the submit step instead of trusting its caller; written by an operator
        (``producer.queue_config``) or seeded by workers."""
        return f"{self.base}:config"

    @property
    def stats(self) -> str:
        """Hash of counters (duplicates suppressed, reclaims, dead-letters, ...)."""
        return f"{self.base}:stats"

    def worker(self, name: str) -> str:
        """Heartbeat hash of one worker (TTL)."""
        return f"{self.base}:worker:{name}"

    def worker_pattern(self) -> str:
        return f"{self.base}:worker:*"

    def batch(self, batch_id: str) -> str:
        """Hash of one batch file run (``slotfill batch``): input, output, totals, state."""
        return f"{self.base}:batch:{batch_id}"

    def batch_jobs(self, batch_id: str) -> str:
        """Hash ``custom_id`` → job id of one batch: what was already submitted."""
        return f"{self.base}:batch:{batch_id}:jobs"

    @property
    def batches(self) -> str:
        """Sorted set of the queue's batch ids, scored by creation time."""
        return f"{self.base}:batches"


def stream_pattern() -> str:
    """``SCAN`` pattern matching every queue's normal-priority stream (queue discovery)."""
    return f"{PREFIX}:{{*}}:stream:{Priority.normal.value}"


def queue_of_key(key: str) -> str | None:
    """The queue name inside a slotfill key (``slotfill:{q}:...`` → ``q``), else None."""
    m = re.match(rf"^{PREFIX}:\{{([^}}]*)\}}:", key)
    return m.group(1) if m and valid_queue_name(m.group(1)) else None
