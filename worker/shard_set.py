"""The shards a worker pulls from (producer/shards.py): every shard of its queue, its home
shard first. Home = ``home_index(worker id, N)`` (BLAKE2b, not CRC-32: CRC-32 is linear, and
names that differ in one character, ``w0``..``w5``, all got the same home mod 3), so a
fleet's workers spread their first reads over the shards; when home gives fewer jobs than
admission wants, the others are read.

Every claimed entry names its stream, and the stream names its shard: the keys of the Lua
steps that act on an entry (finish, renew, release, append) are that shard's, so a call never
mixes slots. An unsharded queue is one shard: nothing here costs a round trip then.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from producer.keys import QueueKeys, queue_of_key
from producer.shards import ShardLayout

T = TypeVar("T")


def home_index(worker: str, n: int) -> int:
    """A worker's home shard: a stable hash of its id, mod ``n``."""
    digest = hashlib.blake2b(worker.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


class ShardSet:
    def __init__(self, queue: str, consumer: str) -> None:
        self.queue = queue
        self.consumer = consumer
        self.layout = ShardLayout.single(queue)
        self.order: list[QueueKeys] = [QueueKeys.for_queue(queue)]
        """Every shard's keys, the home shard first, then the others in layout order after it,
        then the retired ones (producer/shards.py: drained, never fed)."""
        self._by_name: dict[str, QueueKeys] = {queue: self.order[0]}

    @property
    def sharded(self) -> bool:
        return self.layout.sharded

    @property
    def home(self) -> QueueKeys:
        return self.order[0]

    def set_layout(self, layout: ShardLayout) -> bool:
        """Use ``layout``; True when it differs from the one in use."""
        if layout == self.layout:
            return False
        self.layout = layout
        n = layout.n
        home = home_index(self.consumer, n)
        self.order = [*(layout.keys((home + i) % n) for i in range(n)),
                      *layout.every_keys[n:]]
        for k in self.order:
            self._by_name.setdefault(k.queue, k)
        return True

    def keys_of(self, stream: str) -> QueueKeys:
        """The keys of the shard a stream (a claimed entry's) belongs to. An entry of a shard
        dropped from the layout since it was claimed still finishes on its own shard."""
        name = queue_of_key(stream) or self.queue
        keys = self._by_name.get(name)
        if keys is None:
            keys = self._by_name[name] = QueueKeys.for_queue(name)
        return keys

    def group(self, items: Sequence[T], stream_of: Callable[[T], str]
              ) -> list[tuple[QueueKeys, list[int]]]:
        """Positions of ``items`` grouped by their shard (one group when unsharded)."""
        groups: dict[str, tuple[QueueKeys, list[int]]] = {}
        for pos, item in enumerate(items):
            keys = self.keys_of(stream_of(item))
            groups.setdefault(keys.queue, (keys, []))[1].append(pos)
        return list(groups.values())
