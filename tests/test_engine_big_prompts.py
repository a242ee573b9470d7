"""1 MB prompts on the real engine (CPU build, generated tiny model): tokenizing one takes
seconds, and on the worker's event loop that starved lease renewal and heartbeats until the
worker's own live jobs were reclaimed (issue 12 case 5). Off the loop, nothing is."""

from __future__ import annotations

import time

import pytest
import redis

from producer import Client, QueueKeys
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer
from tests.conftest import FEATURE_LEASE_S

pytestmark = pytest.mark.engine


def test_megabyte_prompts_never_starve_leases_or_heartbeats(
        redis_server: RedisServer, r: redis.Redis, feature_worker: WorkerProcess) -> None:
    """On the session's short-lease engine (conftest: ``_feature_engine``, 4 s leases,
    heartbeats every 0.5 s)."""
    w = feature_worker
    keys = QueueKeys.for_queue(w.queue)
    c = Client.from_url(redis_server.url, queue=w.queue)
    try:
        prompt = " ".join(f"word{i % 977}" for i in range(130_000))[:1_000_000]
        # As many as the worker holds (4 slots + 2 headroom): tokenized on the event loop
        # they stopped its heartbeats for 10 s (measured, the fix undone), past the lease.
        big = c.submit_many([{"prompt": prompt, "max_tokens": 4}] * 6)
        small = [c.submit("hello", max_tokens=4, ignore_eos=True).id for _ in range(4)]
        done: set[str] = set()
        last_beat, gaps, last = None, [0.0], time.monotonic()
        end = time.monotonic() + 300
        while len(done) < len(big) + len(small):
            assert time.monotonic() < end, w.tail()
            beat = r.hget(keys.worker(w.consumer), "seen_at")
            if beat != last_beat:
                now = time.monotonic()
                gaps.append(now - last)
                last, last_beat = now, beat
            done = {i for i in big + small if r.hget(keys.job(i), "result") is not None}
            time.sleep(0.1)
        results = {i: c.result(i) for i in big + small}
        stats = {k.decode(): int(v) for k, v in r.hgetall(keys.stats).items()}
    finally:
        c.close()
    attempts = [res.attempts for res in results.values() if res is not None]
    print(f"\n1 MB prompts: attempts {sorted(attempts)}, stats {stats}, longest heartbeat "
          f"gap {max(gaps):.1f}s, codes "
          f"{sorted({(res.error.code if res and res.error else 'ok') for res in results.values()})}")
    assert all(res is not None and res.attempts == 1 for res in results.values())
    # A gap is seen from this process too (it polls every 0.1 s): the lease is the bound
    # that matters, the gap past which a peer may take the jobs.
    assert max(gaps) < FEATURE_LEASE_S, gaps
    assert stats.get("reclaimed", 0) == 0 and "reclaimed (delivery" not in w.tail(2000)
    assert all(results[i] is not None and results[i].ok for i in small)  # type: ignore[union-attr]
