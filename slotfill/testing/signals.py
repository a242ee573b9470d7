"""What a job's end may leave behind for those who wait on it (PROTOCOL.md, "Reading the
result"), checked per job by the invariant checkers (kill_soak, stream_check).

A job whose record says ``notify=waiters`` (submitted with this submit_job) gets no done list;
any other (plain ``XADD``, an older submit_job) gets exactly one signal there. Either way each
waiter registered (``wait_jobs``) while the job ran gets its result pushed once: a soak
registers a *watch* on every job it submits, and a second publish shows as a second push.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis

from producer import waiting
from producer.keys import QueueKeys
from producer.scripts import source
from producer.shards import ShardLayout

WATCH_S = 86400
"""How long a soak's watch lasts (the step's longest wait)."""


def watch(r: redis.Redis, where: QueueKeys | ShardLayout, token: str, ids: list[str]) -> None:
    """Register ``token`` as a waiter on ``ids`` (each on its shard, for a layout; those
    already ended are not registered)."""
    script = r.register_script(source("wait_jobs"))
    groups = (waiting.by_shard(where, ids) if isinstance(where, ShardLayout)
              else {where: ids})
    for keys, group in groups.items():
        for start in range(0, len(group), waiting.REGISTER_CHUNK):
            key_list, args = waiting.register_args(
                keys, token, group[start:start + waiting.REGISTER_CHUNK], WATCH_S)
            script(keys=key_list, args=args)


def pushes(r: redis.Redis, where: QueueKeys | Iterable[QueueKeys], token: str | None
           ) -> Counter[str]:
    """How often each job's result was pushed onto ``token``'s waiter list (of every queue or
    shard of ``where``; no token: none)."""
    if token is None:
        return Counter()
    out: Counter[str] = Counter()
    for keys in ([where] if isinstance(where, QueueKeys) else where):
        raw: list[Any] = r.lrange(keys.waiter(token), 0, -1)  # type: ignore[assignment]
        out.update(str(json.loads(x)["id"]) for x in raw)  # each a result JSON
    return out


def problem(job_id: str, notify: Any, waiters: Any, done_len: int, pushed: Counter[str],
            token: str | None) -> str | None:
    """What is wrong with one terminal job's signals, or None."""
    want = 0 if notify in (b"waiters", "waiters") else 1
    if done_len != want:
        return f"done list holds {done_len} signals, not {want}"
    if token is None:
        return None
    raw = waiters.decode() if isinstance(waiters, bytes) else str(waiters or "")
    watched = any(item.split("@")[0] == token for item in raw.split())
    if pushed[job_id] != (1 if watched else 0):
        when = "before" if watched else "after"
        return f"pushed {pushed[job_id]} times to a waiter registered {when} its end"
    return None


def fields(names: Iterable[str] = ()) -> list[str]:
    """The record fields :func:`problem` reads, after ``names``."""
    return [*names, "notify", "waiters"]
