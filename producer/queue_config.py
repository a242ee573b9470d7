"""A queue's own limits, kept in Redis (``slotfill:{Q}:config``) so that the submit step
reads them there instead of trusting whoever calls it; and its shard layout
(producer/shards.py), read there by every client and worker."""

from __future__ import annotations

from typing import Any

from producer import shards as sharding
from producer.keys import QueueKeys

DEFAULT_MAX_PENDING = 100_000
"""The cap ``submit_job`` applies while the queue's config has no ``max_pending``."""
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576
"""The body size limit ``submit_job`` applies while the config has no ``max_payload_bytes``."""


def config_fields(max_pending: int | None = None,
                  max_payload_bytes: int | None = None) -> dict[str, int]:
    """The config hash fields to write; ValueError for a limit below 1."""
    fields = {k: v for k, v in (("max_pending", max_pending),
                                ("max_payload_bytes", max_payload_bytes)) if v is not None}
    for k, v in fields.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a whole number >= 1, got {v!r}")
    return fields


def configure(r: Any, keys: QueueKeys, max_pending: int | None = None,
              max_payload_bytes: int | None = None, shards: int | None = None
              ) -> dict[str, int]:
    """Set the queue's limits (an operator's act: clients never send them) and, with
    ``shards``, its shard layout; the limits go to every shard's config (the submit step
    reads its own shard's: ``max_pending`` caps each shard). Returns what was written.
    ``r``: a blocking ``redis.Redis``."""
    fields = config_fields(max_pending, max_payload_bytes)
    if shards is not None:
        sharding.shard_names(keys.queue, shards)  # refuse a bad count before writing anything
    layout = sharding.read_layout(r, keys.queue)
    if fields:
        for k in layout.all_keys:
            r.hset(k.config, mapping=fields)
    if shards is not None:
        sharding.write_layout(r, keys.queue, shards)
        return {**fields, "shards": shards}
    return fields
