"""Submit throughput and Redis commands per submitted job, against a fresh Redis (no worker).

- jobs/s of ``Client.submit`` one by one (one round trip each) and of ``Client.submit_many``
  (pipelined in chunks of 1000), from one client on loopback;
- Redis commands per job (``INFO commandstats`` deltas, script-internal commands included)
  at two queue depths: an empty queue and one already holding ``depth`` jobs. Constant in
  depth means the submit path does no work proportional to the queue.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

import redis

from bench.redis_server import bench_redis
from bench.redis_stats import command_calls, delta, per_job
from bench.workload import Request
from producer import Client, QueueKeys


def _bodies(reqs: list[Request], n: int) -> list[dict[str, object]]:
    return [reqs[i % len(reqs)].job() for i in range(n)]


def run_submit_bench(reqs: list[Request], single: int = 2000, many: int = 20_000,
                     depth: int = 100_000, probe: int = 5000,
                     progress: Callable[[str], None] = lambda s: None,
                     boost: bool = True) -> dict[str, Any]:
    with bench_redis(tempfile.mkdtemp(prefix="slotfill-bench-submit-"), boost) as server:
        r = redis.Redis.from_url(server.url)
        c = Client.from_url(server.url)
        for name in ("single", "many", "empty", "deep"):
            c.configure_queue(max_pending=10 * (depth + probe + many + single), queue=name)
        out: dict[str, Any] = {"redis_appendfsync": server.appendfsync,
                               "prompt_tokens_per_job": sum(q.n_prompt for q in reqs) / len(reqs)}

        progress(f"submit one by one ({single} jobs)")
        bodies = _bodies(reqs, single)
        t = time.perf_counter()
        for b in bodies:
            c.submit(request=b, queue="single")
        out["submit_jobs_s"] = single / (time.perf_counter() - t)

        progress(f"submit_many ({many} jobs)")
        bodies = _bodies(reqs, many)
        t = time.perf_counter()
        c.submit_many(bodies, queue="many")
        out["submit_many_jobs_s"] = many / (time.perf_counter() - t)

        depths = {}
        for name, fill in (("empty", 0), ("deep", depth)):
            if fill:
                progress(f"filling a queue to depth {fill}")
                for i in range(0, fill, 20_000):
                    c.submit_many(_bodies(reqs, min(20_000, fill - i)), queue=name)
            progress(f"commands per job at depth {fill}")
            before = command_calls(r)
            bodies = _bodies(reqs, probe)
            t = time.perf_counter()
            c.submit_many(bodies, queue=name)
            elapsed = time.perf_counter() - t
            d = per_job(delta(before, command_calls(r)), probe)
            d["depth_before"] = fill
            d["depth_after"] = int(r.xlen(QueueKeys.for_queue(name).stream("normal")))
            d["submit_many_jobs_s"] = probe / elapsed
            depths[name] = d
        out["depths"] = depths
        c.close()
        r.close()
        return out
