"""Read a queue's state from Redis: what ``slotfill status`` shows and ``/metrics`` exports.

Synchronous on purpose: the status CLI is synchronous and the metrics collector runs in the
Prometheus HTTP thread, off the worker's event loop. A handful of commands per queue, none
of them O(queue depth): ``XLEN``, ``XINFO GROUPS``, one ``XRANGE ... COUNT 1`` per stream.

Lag is computed as ``XLEN - pending``: finished entries are deleted (``XDEL``) in the same
step that acknowledges them, so a stream holds exactly its undelivered entries plus the
delivered-but-unacknowledged ones (the PEL). Redis' own ``lag`` field of ``XINFO GROUPS``
cannot be computed once entries were deleted, so it is not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.keys import GROUP, PRIORITIES, QueueKeys, queue_of_key, stream_pattern
from producer.shards import SHARD_OF_FIELD, ShardLayout, read_layout


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def entry_time(entry_id: str) -> float | None:
    """Unix seconds encoded in a stream entry id (``<ms>-<seq>``)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return None


@dataclass
class StreamStats:
    priority: str
    depth: int = 0
    """Unfinished entries (``XLEN``): waiting + running."""
    pending: int = 0
    """Delivered, not yet acknowledged (the group's PEL): running on some worker."""
    consumers: int = 0
    oldest_waiting_age: float = 0.0
    """Seconds the oldest undelivered entry has waited; 0 when none waits."""

    @property
    def lag(self) -> int:
        """Entries no worker has read yet: what an autoscaler should scale on."""
        return max(0, self.depth - self.pending)


@dataclass
class WorkerBeat:
    """One live worker's heartbeat hash."""

    name: str
    fields: dict[str, str]

    def num(self, key: str, default: float = 0.0) -> float:
        try:
            return float(self.fields.get(key, default))
        except ValueError:
            return default

    @property
    def occupancy(self) -> float:
        slots = self.num("slots")
        return self.num("running") / slots if slots else 0.0


@dataclass
class QueueSnapshot:
    queue: str
    streams: list[StreamStats]
    dead_letters: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    workers: list[WorkerBeat] = field(default_factory=list)
    taken_at: float = field(default_factory=time.time)
    shards: list[str] = field(default_factory=list)
    """The physical queues summed here (producer/shards.py); empty: the queue alone."""

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.streams)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.streams)

    @property
    def lag(self) -> int:
        return sum(s.lag for s in self.streams)

    @property
    def oldest_waiting_age(self) -> float:
        return max((s.oldest_waiting_age for s in self.streams), default=0.0)

    @property
    def finished(self) -> dict[str, int]:
        return {k[len("finished_"):]: v for k, v in self.stats.items() if k.startswith("finished_")}


def snapshot(r: redis.Redis, queue: str, *, workers: bool = True,
             now: float | None = None) -> QueueSnapshot:
    """A queue's state; a sharded queue's is the sum over its shards (workers heartbeat
    under the queue itself)."""
    try:
        layout = read_layout(r, queue)
    except ValueError:
        layout = ShardLayout.single(queue)
    now = time.time() if now is None else now
    parts = [_shard_snapshot(r, k.queue, now) for k in layout.every_keys]
    snap = parts[0] if len(parts) == 1 else _merged(queue, parts, now)
    if len(parts) > 1:
        snap.shards = [k.queue for k in layout.every_keys]
    if workers:
        snap.workers = worker_beats(r, QueueKeys.for_queue(queue))
    return snap


def _merged(queue: str, parts: list[QueueSnapshot], now: float) -> QueueSnapshot:
    streams = [StreamStats(
        prio.value, depth=sum(p.streams[i].depth for p in parts),
        pending=sum(p.streams[i].pending for p in parts),
        consumers=max(p.streams[i].consumers for p in parts),
        oldest_waiting_age=max(p.streams[i].oldest_waiting_age for p in parts))
        for i, prio in enumerate(PRIORITIES)]
    stats: dict[str, int] = {}
    for p in parts:
        for k, v in p.stats.items():
            stats[k] = stats.get(k, 0) + v
    return QueueSnapshot(queue, streams, dead_letters=sum(p.dead_letters for p in parts),
                         stats=stats, taken_at=now)


def _shard_snapshot(r: redis.Redis, queue: str, now: float) -> QueueSnapshot:
    keys = QueueKeys.for_queue(queue)
    pipe = r.pipeline(transaction=False)
    for stream in keys.streams:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
    pipe.xlen(keys.dead_letter)
    pipe.hgetall(keys.stats)
    replies = pipe.execute(raise_on_error=False)
    streams: list[StreamStats] = []
    last_ids: list[str] = []
    for i, prio in enumerate(PRIORITIES):
        depth, groups = replies[2 * i], replies[2 * i + 1]
        st = StreamStats(prio.value, depth=int(depth) if isinstance(depth, int) else 0)
        last = "0-0"
        if isinstance(groups, list):
            for g in groups:
                if _s(g.get("name")) == GROUP:
                    st.pending = int(g.get("pending") or 0)
                    st.consumers = int(g.get("consumers") or 0)
                    last = _s(g.get("last-delivered-id") or "0-0")
        streams.append(st)
        last_ids.append(last)
    dead = replies[-2] if isinstance(replies[-2], int) else 0
    raw_stats = replies[-1] if isinstance(replies[-1], dict) else {}
    stats = {}
    for k, v in raw_stats.items():
        try:
            stats[_s(k)] = int(v)
        except ValueError:
            continue
    waiting = [(st, keys.stream(st.priority), last)
               for st, last in zip(streams, last_ids, strict=True) if st.lag > 0]
    if waiting:
        pipe = r.pipeline(transaction=False)
        for _, stream, last in waiting:
            pipe.xrange(stream, min=f"({last}", count=1)
        for (st, _, _), entries in zip(waiting, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(entries, list) and entries:
                t = entry_time(_s(entries[0][0]))
                if t is not None:
                    st.oldest_waiting_age = max(0.0, now - t)
    return QueueSnapshot(queue, streams, dead_letters=dead, stats=stats, taken_at=now)


def worker_beats(r: redis.Redis, keys: QueueKeys) -> list[WorkerBeat]:
    names = sorted({_s(k) for k in r.scan_iter(match=keys.worker_pattern(), count=1000)})
    if not names:
        return []
    pipe = r.pipeline(transaction=False)
    for k in names:
        pipe.hgetall(k)
    beats = []
    prefix = keys.worker("")
    for k, fields in zip(names, pipe.execute(), strict=True):
        if fields:
            beats.append(WorkerBeat(k[len(prefix):], {_s(a): _s(b) for a, b in fields.items()}))
    return beats


def discover_queues(r: redis.Redis) -> list[str]:
    """Every queue with a job stream in this Redis (a ``SCAN``; for humans, not hot paths).
    A sharded queue's shards count as the queue itself, not as queues of their own."""
    found = sorted({q for k in r.scan_iter(match=stream_pattern(), count=1000)
                    if (q := queue_of_key(_s(k)))})
    if not found:
        return []
    pipe = r.pipeline(transaction=False)
    for q in found:
        pipe.hget(QueueKeys.for_queue(q).config, SHARD_OF_FIELD)
    owners = pipe.execute()
    return sorted({_s(o) if o else q for q, o in zip(found, owners, strict=True)})
