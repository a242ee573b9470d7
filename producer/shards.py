"""One logical queue split into N shards, each a physical queue with its own hash tag, so
that a Redis Cluster spreads one queue's work over N masters (issue 13, "past one core").

The layout lives in the queue's config hash (``slotfill:{Q}:config``): ``shards`` (N) and
``shard_names`` (the N physical queue names, comma-separated, shard 0 first). Shard 0 is Q
itself: a queue without these fields is a 1-shard queue and nothing about it changes.
Shard i > 0 is named ``<Q>.s<i>.<k>`` with the first k whose hash slot lies in the middle
half of the slot range (r0 + i) mod N of N equal ranges, r0 being Q's own range: N masters
given equal ranges (``redis-cli --cluster create``) each serve one shard. Written through a
cluster client, the names follow the cluster's actual slot map instead: the first k whose
slot is served by a master holding the fewest shards so far (shard 0 counted), so shards land
on distinct masters whatever the ranges (a resharded cluster), while there are as many masters
as shards. The names are computed once, when an operator writes the layout, and stored, so
clients in any language only read them.

Routing rules (the same in every client):

* A job's shard is ``crc32(job id) mod N`` (zlib's CRC-32 of the id's ASCII bytes): every
  by-id call finds the job without being told where it is.
* Without an idempotency key the id is random, so jobs spread evenly. With one, the shard is
  ``crc32(idempotency key) mod N`` and the client mints random ids until one maps to that
  shard (about N tries): the key lives on exactly one shard, and its job's id still routes
  there, so both stay exact.
* Changing N changes where ids route (and the names of shards i > 0). Shards a new layout
  drops while they still hold unfinished jobs are kept as ``retired_shards``: workers go on
  draining them (after every current shard), no submit goes there, and by-id calls that miss
  on the routed shard look in every other shard, retired ones included, before reporting
  JobNotFound (more reads, only on a miss). A retired shard found empty when the layout is
  next written is dropped: the finished records it still holds are then reachable only by
  its own name (``queue=<shard name>``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from producer import protocol
from producer.connection import is_cluster
from producer.errors import InvalidRequest
from producer.keys import QueueKeys, valid_queue_name
from producer.protocol import new_job_id
from producer.schema import JobRequest
from producer.settings import ClientSettings

MAX_SHARDS = 64
SHARDS_FIELD = "shards"
NAMES_FIELD = "shard_names"
RETIRED_FIELD = "retired_shards"
SHARD_OF_FIELD = "shard_of"
"""Set in a shard's own config (i > 0): the logical queue it belongs to."""
LAYOUT_TTL_S = 5.0
"""How long a client trusts the layout it read before it reads it again."""
_NAME_TRIES = 1_000_000


def shard_index(key: str, n: int) -> int:
    """The shard of a job id (or of an idempotency key): ``crc32(key) mod n``."""
    return zlib.crc32(key.encode("utf-8")) % n if n > 1 else 0


def queue_slot(queue: str) -> int:
    """The Redis Cluster hash slot of every key of physical queue ``queue``."""
    return key_slot(QueueKeys.for_queue(queue).base.encode())


def slot_range(slot: int, n: int) -> int:
    """Which of ``n`` equal slot ranges ``slot`` falls in."""
    return slot * n // REDIS_CLUSTER_HASH_SLOTS


def _mid_range(slot: int, part: int, n: int) -> bool:
    """``slot`` is in the middle half of range ``part``: far from where any rounding of the
    range edges (``redis-cli`` rounds them) could put it on a neighbour."""
    width = REDIS_CLUSTER_HASH_SLOTS / n
    lo = part * width
    return lo + width / 4 <= slot < lo + 3 * width / 4


def shard_names(queue: str, n: int, owner: Callable[[str], str] | None = None,
                masters: Sequence[str] = ()) -> list[str]:
    """The N physical queue names of ``queue`` split N ways (deterministic). ``owner``: the
    master serving a physical queue name, and ``masters`` every master (a cluster's slot
    map); without them, the equal-ranges rule."""
    if not valid_queue_name(queue):
        raise ValueError(f"not a queue name: {queue!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"shards must be a whole number 1..{MAX_SHARDS}, got {n!r}")
    if owner is not None and len(set(masters)) > 1:
        return _names_by_owner(queue, n, owner, masters)
    home = slot_range(queue_slot(queue), n)
    names = [queue]
    for i in range(1, n):
        part = (home + i) % n
        for k in range(_NAME_TRIES):
            name = _shard_name(queue, i, k)
            if _mid_range(queue_slot(name), part, n):
                names.append(name)
                break
        else:  # pragma: no cover - 16384 slots, a quarter of a range always has some
            raise LookupError(f"no shard name for {queue!r} in slot range {part}")
    return names


def _shard_name(queue: str, i: int, k: int) -> str:
    name = f"{queue}.s{i}.{k}"
    if not valid_queue_name(name):
        raise ValueError(f"queue name {queue!r} is too long to shard ({name!r})")
    return name


def _names_by_owner(queue: str, n: int, owner: Callable[[str], str],
                    masters: Sequence[str]) -> list[str]:
    """Shard names placed on the masters holding the fewest shards (the cluster's map)."""
    held = dict.fromkeys(masters, 0)
    if owner(queue) in held:
        held[owner(queue)] += 1
    names = [queue]
    for i in range(1, n):
        fewest = min(held.values())
        for k in range(_NAME_TRIES):
            name = _shard_name(queue, i, k)
            if held.get(owner(name), -1) == fewest:
                held[owner(name)] += 1
                names.append(name)
                break
        else:  # pragma: no cover - every master serves some slots
            raise LookupError(f"no shard name for {queue!r} on a master with {fewest} shards")
    return names


@dataclass(frozen=True)
class ShardLayout:
    """Where a logical queue's jobs live. ``names[0]`` is the queue itself."""

    queue: str
    names: tuple[str, ...]
    retired: tuple[str, ...] = ()
    """Shards of an earlier layout that still held unfinished jobs: drained, never fed."""

    @classmethod
    def single(cls, queue: str) -> ShardLayout:
        return cls(queue, (queue,))

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def sharded(self) -> bool:
        """More than one physical queue to look in (current or retired shards)."""
        return self.n > 1 or bool(self.retired)

    def keys(self, i: int = 0) -> QueueKeys:
        return QueueKeys.for_queue(self.names[i])

    @property
    def all_keys(self) -> list[QueueKeys]:
        return [self.keys(i) for i in range(self.n)]

    def for_job(self, job_id: str) -> QueueKeys:
        """The keys of the shard that holds ``job_id`` (by the routing rule)."""
        return self.keys(shard_index(job_id, self.n))

    @property
    def every_keys(self) -> list[QueueKeys]:
        """The current shards, then the retired ones: what workers pull and status sums."""
        return [*self.all_keys, *(QueueKeys.for_queue(x) for x in self.retired)]

    def others(self, job_id: str) -> list[QueueKeys]:
        """Every shard but the routed one: where a job of an older layout may be."""
        home = shard_index(job_id, self.n)
        return [k for i, k in enumerate(self.every_keys) if i != home]

    def mint(self, idempotency_key: str | None = None) -> tuple[str, QueueKeys]:
        """A new job id and its shard's keys: a random shard, or the idempotency key's."""
        job_id = new_job_id()
        if not self.sharded:
            return job_id, self.keys(0)
        if idempotency_key is None:
            return job_id, self.for_job(job_id)
        want = shard_index(idempotency_key, self.n)
        while shard_index(job_id, self.n) != want:
            job_id = new_job_id()
        return job_id, self.keys(want)

    def fields(self) -> dict[str, str]:
        """The config hash fields that store this layout."""
        out = {SHARDS_FIELD: str(self.n), NAMES_FIELD: ",".join(self.names)}
        if self.retired:
            out[RETIRED_FIELD] = ",".join(self.retired)
        return out


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def parse_layout(queue: str, shards: Any, names: Any, retired: Any = None) -> ShardLayout:
    """The layout from the config's ``shards``, ``shard_names`` and ``retired_shards``
    (none: one shard). InvalidRequest (a ValueError) for a stored layout that contradicts
    itself (never guessed at: a wrong guess would route jobs where nobody looks)."""
    old = tuple(x for x in _s(retired or "").split(",") if x)
    listed: tuple[str, ...] = (queue,)
    n = 1
    if shards is not None or names is not None:
        listed = tuple(_s(names or "").split(","))
        try:
            n = int(_s(shards))
        except ValueError:
            n = -1
    every = (*listed, *old)
    if (n != len(listed) or listed[0] != queue or not all(valid_queue_name(x) for x in every)
            or len(set(every)) != len(every)):
        raise InvalidRequest(f"queue {queue!r} has a broken shard layout in its config: "
                             f"shards={_s(shards)!r} shard_names={_s(names)!r} "
                             f"retired_shards={_s(retired)!r}")
    return ShardLayout(queue, listed, old)


LAYOUT_FIELDS = (SHARDS_FIELD, NAMES_FIELD, RETIRED_FIELD)


def read_layout(r: Any, queue: str) -> ShardLayout:
    """The layout of ``queue`` from a blocking client (one ``HMGET``)."""
    return parse_layout(queue, *r.hmget(QueueKeys.for_queue(queue).config, *LAYOUT_FIELDS))


async def read_layout_async(r: Any, queue: str) -> ShardLayout:
    return parse_layout(queue, *await r.hmget(QueueKeys.for_queue(queue).config, *LAYOUT_FIELDS))


class LayoutCache:
    """Layouts read at most every ``ttl`` seconds per queue (``LAYOUT_TTL_S``)."""

    def __init__(self, ttl: float = LAYOUT_TTL_S, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._held: dict[str, tuple[float, ShardLayout]] = {}

    def get(self, queue: str) -> ShardLayout | None:
        held = self._held.get(queue)
        if held is None or self._clock() - held[0] > self.ttl:
            return None
        return held[1]

    def put(self, layout: ShardLayout) -> ShardLayout:
        self._held[layout.queue] = (self._clock(), layout)
        return layout

    def forget(self, queue: str) -> None:
        self._held.pop(queue, None)


T = TypeVar("T")


K = TypeVar("K")


def by_shard(items: Sequence[T], shard_of: Callable[[T], K]) -> dict[K, list[int]]:
    """Positions of ``items`` grouped by shard, each group in input order."""
    groups: dict[K, list[int]] = {}
    for pos, item in enumerate(items):
        groups.setdefault(shard_of(item), []).append(pos)
    return groups


def write_layout(r: Any, queue: str, n: int) -> ShardLayout:
    """Split ``queue`` into ``n`` shards (an operator's act; ``n`` = 1 joins it back).
    Each shard i > 0 gets ``shard_of`` and the queue's limits in its own config (the submit
    step reads a shard's own config: ``max_pending`` caps each shard). Shards dropped while
    they hold unfinished jobs are kept as retired (drained, never fed). Returns the layout.
    ``r``: a blocking client."""
    names = shard_names(queue, n, *_slot_map(r))
    before = read_layout(r, queue)
    retired = tuple(x for x in dict.fromkeys((*before.names[1:], *before.retired))
                    if x not in names and _unfinished(r, x))
    layout = ShardLayout(queue, tuple(names), retired)
    config = QueueKeys.for_queue(queue).config
    limits = {_s(k): _s(v) for k, v in r.hgetall(config).items()
              if _s(k) in ("max_pending", "max_payload_bytes")}
    for i, name in enumerate(names[1:], start=1):
        r.hset(QueueKeys.for_queue(name).config,
               mapping={SHARD_OF_FIELD: queue, "shard_index": str(i), **limits})
    r.hdel(config, *LAYOUT_FIELDS)
    if n > 1 or retired:
        r.hset(config, mapping=layout.fields())
    return layout


def _slot_map(r: Any) -> tuple[Callable[[str], str] | None, list[str]]:
    """A cluster client's view of which master serves a physical queue, and its masters
    (from the client's slot cache: no round trip); nothing off a cluster."""
    if not is_cluster(r):
        return None, []

    def owner(name: str) -> str:
        node = r.get_node_from_key(QueueKeys.for_queue(name).base)
        return f"{node.host}:{node.port}"

    return owner, [f"{m.host}:{m.port}" for m in r.get_primaries()]


def _unfinished(r: Any, queue: str) -> int:
    """Unfinished entries (queued or running) of a physical queue."""
    return sum(int(r.xlen(s)) for s in QueueKeys.for_queue(queue).streams)


Call = tuple[list[str], list[str | int | float]]


def submit_calls(layout: ShardLayout, settings: ClientSettings,
                 requests: Iterable[JobRequest | dict[str, Any]]
                 ) -> list[tuple[QueueKeys, Call]]:
    """``submit_job`` calls for ``requests``, each with its shard (random ids: spread evenly).
    Every request is validated before any is sent, so a bad one refuses the whole batch."""
    out: list[tuple[QueueKeys, Call]] = []
    for r in requests:
        req = protocol.build_request(r, {}, None)
        job_id, keys = layout.mint()
        out.append((keys, protocol.submit_call(keys, settings, req, None, job_id)))
    return out


def submit_by_shard(calls: Sequence[tuple[QueueKeys, Call]],
                    send: Callable[[QueueKeys, list[Call]], list[str | None]]
                    ) -> list[str | None]:
    """Each shard's calls in one ``send`` (a batched script's keys must share one slot).
    Returns the job ids (None: refused, the shard is full) in input order."""
    out: list[str | None] = [None] * len(calls)
    for where in by_shard(calls, lambda c: c[0].queue).values():
        got = send(calls[where[0]][0], [calls[p][1] for p in where])
        for p, job in zip(where, got, strict=True):
            out[p] = job
    return out


def submit_call(layout: ShardLayout, settings: ClientSettings, req: JobRequest,
                idempotency_key: str | None) -> tuple[QueueKeys, Call]:
    """The shard's keys and the ``submit_job`` call of one request (routed as above)."""
    job_id, keys = layout.mint(idempotency_key)
    return keys, protocol.submit_call(keys, settings, req, idempotency_key, job_id)
