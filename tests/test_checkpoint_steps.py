"""The checkpoint half of ``append_tokens``: fenced by attempt, idempotent by position, and
one lineage only (a resumed attempt continues exactly the checkpoint it read; an attempt
that starts over clears it); a resumed streaming job's stream gets ``moved``, not ``start``."""

from __future__ import annotations

import json

import redis

from producer import Client
from producer.keys import QueueKeys
from producer.scripts import source


def _append(r: redis.Redis, keys: QueueKeys, job_id: str, attempt: int, ids: list[int],
            offset: int, seq: int, *, stream: bool = False, resumed_at: int | None = None) -> int:
    script = r.register_script(source("append_tokens"))
    return int(script(
        keys=[keys.job(job_id), keys.tokens(job_id), keys.checkpoint(job_id)],
        args=[attempt, 1000, 60, "w", "".join(f" t{t}" for t in ids) if stream else "",
              json.dumps(ids) if stream and ids else "", offset, len(ids), seq,
              "1" if stream else "0", "".join(f"{t}," for t in ids),
              "" if resumed_at is None else resumed_at, 60]))


def _ids(r: redis.Redis, keys: QueueKeys, job_id: str) -> list[int]:
    raw = (r.get(keys.checkpoint(job_id)) or b"").decode()
    return [int(x) for x in raw.split(",") if x]


def _running(r: redis.Redis, client: Client, queue: str, attempts: int,
             stream: bool = False) -> tuple[QueueKeys, str]:
    keys = QueueKeys.for_queue(queue)
    job = client.submit("x", stream=stream)
    r.hset(keys.job(job.id), mapping={"status": "running", "attempts": attempts})
    return keys, job.id


def test_checkpoint_writes_are_fenced_idempotent_and_gapless(
        r: redis.Redis, client: Client, queue: str) -> None:
    keys, job = _running(r, client, queue, 1)
    assert _append(r, keys, job, 1, [1, 2], 0, 1) == 1
    assert _append(r, keys, job, 1, [1, 2], 0, 1) == 1  # a retry: nothing added
    assert _append(r, keys, job, 1, [5], 3, 2) == -1    # a gap
    assert _append(r, keys, job, 1, [3], 2, 2) == 1
    assert _ids(r, keys, job) == [1, 2, 3]
    r.hset(keys.job(job), "attempts", 2)                # a peer reclaimed it
    assert _append(r, keys, job, 1, [4], 3, 3) == 0     # the old attempt adds nothing
    assert _append(r, keys, job, 2, [9], 2, 1, resumed_at=2) == -1  # not what it holds
    assert _append(r, keys, job, 2, [4, 5], 3, 1, resumed_at=3) == 1
    assert _ids(r, keys, job) == [1, 2, 3, 4, 5]
    assert 0 < r.ttl(keys.checkpoint(job)) <= 60
    r.hset(keys.job(job), "attempts", 3)
    assert _append(r, keys, job, 3, [7], 0, 1) == 1     # starts over: the lineage is cleared
    assert _ids(r, keys, job) == [7]
    r.hset(keys.job(job), "status", "succeeded")
    assert _append(r, keys, job, 3, [8], 1, 2) == 0


def test_a_resumed_stream_says_moved_and_keeps_the_earlier_text(
        r: redis.Redis, client: Client, queue: str) -> None:
    keys, job = _running(r, client, queue, 1, stream=True)
    assert _append(r, keys, job, 1, [1, 2], 0, 1, stream=True) == 1
    r.hset(keys.job(job), "attempts", 2)
    assert _append(r, keys, job, 2, [3], 2, 1, stream=True, resumed_at=2) == 1
    entries = [{k.decode(): v.decode() for k, v in f.items()}
               for _id, f in r.xrange(keys.tokens(job))]
    assert [e["type"] for e in entries] == ["start", "delta", "moved", "delta"]
    assert entries[2]["at"] == "2" and entries[3]["offset"] == "2"
    assert "".join(e.get("text", "") for e in entries) == " t1 t2 t3"
    assert _ids(r, keys, job) == [1, 2, 3]
