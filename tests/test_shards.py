"""Sharded queues, the pure parts (producer/shards.py): which names the shards get, where a
job id and an idempotency key route, and the layout kept in the queue's config (fakeredis)."""

from __future__ import annotations

import zlib
from collections import Counter

import fakeredis
import pytest
import redis

from producer import Client, ClientSettings, InvalidRequest, JobNotFound
from producer.keys import QueueKeys
from producer.shards import (
    ShardLayout,
    parse_layout,
    queue_slot,
    read_layout,
    shard_index,
    shard_names,
    slot_range,
)
from worker.shard_set import ShardSet, home_index


@pytest.mark.parametrize("n", [2, 3, 4, 7])
@pytest.mark.parametrize("queue", ["default", "qa", "orders", "x", "a-long.queue_name"])
def test_every_shard_gets_its_own_slot_range(queue: str, n: int) -> None:
    names = shard_names(queue, n)
    assert names[0] == queue and len(names) == n and len(set(names)) == n
    assert names == shard_names(queue, n)  # deterministic: any client computes the same
    ranges = [slot_range(queue_slot(x), n) for x in names]
    assert sorted(ranges) == list(range(n))
    width = 16384 / n
    for x, part in zip(names[1:], ranges[1:], strict=True):
        # the middle half of the range: no rounding of range edges moves it to a neighbour
        off = queue_slot(x) - part * width
        assert width / 4 <= off < 3 * width / 4
        assert QueueKeys.for_queue(x).queue == x  # a valid queue name


@pytest.mark.parametrize("queue", ["default", "orders", "x"])
def test_a_cluster_with_unequal_ranges_gets_one_shard_per_master(queue: str) -> None:
    """A resharded cluster: master A serves slots 0-999, B 1000-1999, C the rest. The
    equal-ranges rule would put every shard on C; the slot map spreads them."""
    def owner(name: str) -> str:
        slot = queue_slot(name)
        return "A" if slot < 1000 else "B" if slot < 2000 else "C"

    names = shard_names(queue, 3, owner, ["A", "B", "C"])
    assert names[0] == queue and len(set(names)) == 3
    assert sorted(owner(x) for x in names) == ["A", "B", "C"]
    assert names == shard_names(queue, 3, owner, ["A", "B", "C"])  # deterministic
    # More shards than masters: spread evenly (2, 2, 2 of 6).
    six = shard_names(queue, 6, owner, ["A", "B", "C"])
    assert sorted(Counter(owner(x) for x in six).values()) == [2, 2, 2]
    # One master: nothing to spread over, the equal-ranges rule.
    assert shard_names(queue, 3, owner, ["A"]) == shard_names(queue, 3)


def test_shard_counts_and_names_that_cannot_be() -> None:
    for bad in (0, -1, 65, True):
        with pytest.raises(ValueError):
            shard_names("q", bad)
    with pytest.raises(ValueError, match="too long"):
        shard_names("q" * 64, 2)
    assert shard_names("q", 1) == ["q"]


def test_job_ids_route_by_crc32() -> None:
    assert shard_index("abc", 3) == zlib.crc32(b"abc") % 3
    assert shard_index("abc", 1) == 0
    layout = ShardLayout("q", tuple(shard_names("q", 3)))
    seen = [0, 0, 0]
    for _ in range(3000):
        job_id, keys = layout.mint()
        i = zlib.crc32(job_id.encode()) % 3
        assert keys.queue == layout.names[i] and layout.for_job(job_id) == keys
        seen[i] += 1
    assert min(seen) > 800  # random ids spread evenly


def test_an_idempotency_key_picks_the_shard_and_the_id_follows() -> None:
    layout = ShardLayout("q", tuple(shard_names("q", 3)))
    for key in ("order-1", "order-2", "x" * 256):
        want = zlib.crc32(key.encode()) % 3
        for _ in range(20):
            job_id, keys = layout.mint(key)
            assert keys.queue == layout.names[want]
            assert shard_index(job_id, 3) == want  # by-id calls find it without the key


def test_layout_kept_in_the_config(fake_r: redis.Redis) -> None:
    c = Client(fake_r, ClientSettings(queue="lay"))
    assert read_layout(fake_r, "lay") == ShardLayout.single("lay")
    c.configure_queue(max_pending=7)
    assert c.configure_queue(shards=3) == {"shards": 3}
    layout = read_layout(fake_r, "lay")
    assert layout.names == tuple(shard_names("lay", 3))
    raw: dict[bytes, bytes] = fake_r.hgetall(QueueKeys.for_queue("lay").config)  # type: ignore[assignment]
    cfg = {k.decode(): v.decode() for k, v in raw.items()}
    assert cfg["shards"] == "3" and cfg["shard_names"] == ",".join(layout.names)
    for i, name in enumerate(layout.names[1:], start=1):  # limits copied: each shard's cap
        shard_cfg = fake_r.hgetall(QueueKeys.for_queue(name).config)
        assert shard_cfg[b"shard_of"] == b"lay" and shard_cfg[b"shard_index"] == str(i).encode()
        assert shard_cfg[b"max_pending"] == b"7"
    c.configure_queue(max_pending=9)  # a later limit reaches every shard
    assert all(fake_r.hget(k.config, "max_pending") == b"9" for k in layout.all_keys)
    c.configure_queue(shards=1)
    assert read_layout(fake_r, "lay") == ShardLayout.single("lay")
    with pytest.raises(InvalidRequest):
        c.configure_queue(shards=0)


def test_a_broken_layout_is_refused_not_guessed() -> None:
    for shards, names in (("2", "q"), ("2", "other,q.s1.0"), ("x", "q,a"), ("2", "q,q")):
        with pytest.raises(InvalidRequest):
            parse_layout("q", shards, names)


def test_fakeredis_client_spreads_and_finds_jobs(fake_r: redis.Redis) -> None:
    """Submit, batch submit and by-id calls on a 3-shard queue (one server: the routing)."""
    c = Client(fake_r, ClientSettings(queue="spread"))
    c.configure_queue(shards=3)
    layout = c.layout()
    ids = c.submit_many([{"prompt": f"p{i}", "max_tokens": 2} for i in range(60)], chunk=25)
    ids.append(c.submit("one", max_tokens=2).id)
    per_shard = [sum(1 for j in ids if fake_r.exists(k.job(j))) for k in layout.all_keys]
    assert sum(per_shard) == len(ids) and min(per_shard) > 0
    assert all(c.status(j).value == "queued" for j in ids)
    first = c.submit("idem", max_tokens=2, idempotency_key="k1")
    again = c.submit("idem", max_tokens=2, idempotency_key="k1")
    assert (again.id, again.created, first.created) == (first.id, False, True)
    assert c.cancel(first.id) == "cancelled"
    assert c.wait(first.id, timeout=2).status.value == "cancelled"


def test_a_job_of_an_older_layout_is_still_found(fake_r: redis.Redis) -> None:
    c = Client(fake_r, ClientSettings(queue="older"))
    c.configure_queue(shards=3)
    ids = [c.submit("x", max_tokens=2).id for _ in range(12)]
    c.configure_queue(shards=2)
    assert all(c.status(j).value == "queued" for j in ids)
    # wait_many too: ids that route elsewhere now are registered on the shard that has them
    # (cancelled here, so their results come back without blocking); one no shard has is
    # reported as not found.
    assert {c.cancel(j) for j in ids} == {"cancelled"}
    moved = [j for j in ids if c.layout().for_job(j) != c.layout().keys(0)
             and not fake_r.exists(c.layout().for_job(j).job(j))]
    assert moved
    got = c.wait_many(ids, timeout=2)
    assert list(got) == ids and {r.status.value for r in got.values()} == {"cancelled"}
    with pytest.raises(JobNotFound):
        c.wait_many([*ids, "f" * 32], timeout=2)


def test_a_worker_reads_its_home_shard_first() -> None:
    layout = ShardLayout("q", tuple(shard_names("q", 3)))
    homes = set()
    for w in ("w0", "w1", "w2", "w3", "w4", "w5"):
        s = ShardSet("q", w)
        assert s.set_layout(layout) and not s.set_layout(layout)
        assert s.home.queue == layout.names[home_index(w, 3)]
        assert sorted(k.queue for k in s.order) == sorted(layout.names)
        homes.add(s.home.queue)
        stream = layout.keys(2).stream("high")
        assert s.keys_of(stream).queue == layout.names[2]
    assert len(homes) > 1


def test_unsharded_is_one_shard(fake_r: redis.Redis) -> None:
    s = ShardSet("plain", "w")
    assert not s.sharded and [k.queue for k in s.order] == ["plain"]
    assert not s.set_layout(read_layout(fakeredis.FakeRedis(), "plain"))


def test_resharding_keeps_unfinished_shards_until_drained(fake_r: redis.Redis) -> None:
    c = Client(fake_r, ClientSettings(queue="re"))
    c.configure_queue(shards=3)
    old = read_layout(fake_r, "re")
    c.submit_many([{"prompt": "x", "max_tokens": 2}] * 60)
    held = {k.queue for k in old.all_keys if sum(fake_r.xlen(s) for s in k.streams)}
    c.configure_queue(shards=2)
    now = read_layout(fake_r, "re")
    assert now.n == 2 and set(now.retired) == held - set(now.names)
    assert now.retired  # 60 jobs over 3 shards: the dropped ones hold some
    s = ShardSet("re", "w")
    s.set_layout(now)
    assert [k.queue for k in s.order][2:] == list(now.retired)  # drained after the others
    for k in now.every_keys:  # the old shards empty out ...
        for stream in k.streams:
            fake_r.delete(stream)
    c.configure_queue(shards=2)
    assert read_layout(fake_r, "re").retired == ()  # ... and are dropped at the next write
