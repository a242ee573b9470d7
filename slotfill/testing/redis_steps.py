"""Redis CPU per job for each step of a job's life, one step at a time: what
``slotfill.testing.redis_cost`` measures for the whole life, split by step.

    python -m slotfill.testing.redis_steps [--jobs 4000] [--claim 32] [--finish 16] [--aof]

On a redis-server of its own (no AOF unless ``--aof``), with the client and the worker's own
store (``worker.store.WorkerStore``) and no worker process, it runs every job through each
step before the next step begins, and reads ``INFO cpu`` (user + sys) and ``INFO
commandstats`` around each:

- ``submit``: ``submit_many``, chunks of 100;
- ``register``: ``wait_jobs`` on every job, 1,000 a call (``wait_many`` registers so before
  the jobs run);
- ``start``: ``start_jobs``, ``--claim`` jobs a call (a worker asks for its free slots);
- ``finish``: ``finish_job``, ``--finish`` calls at once, batched as one engine step's jobs are;
- ``read``: ``BLMPOP`` of the results off the waiter list, 1,000 a call.

Redis does each step's work in the one command that carries it, so the split is exact up to
the few commands a step needs once per call (reads of the queue's limits, ``XREADGROUP``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis

from producer import Client, QueueKeys
from producer.connection import connect_async
from producer.scripts import source
from producer.waiting import new_token, register_args
from slotfill.testing.redis_server import RedisServer
from worker.claim import ClaimedJob
from worker.store import WorkerStore

QUEUE = "steps"


class _Meter:
    """Redis CPU and commands per job for each step, in the order measured."""

    def __init__(self, r: redis.Redis, jobs: int) -> None:
        self.r, self.jobs = r, jobs
        self.rows: dict[str, dict[str, float]] = {}

    def _read(self) -> tuple[float, float]:
        cpu: dict[str, Any] = self.r.info("cpu")  # type: ignore[assignment]
        stats: dict[str, Any] = self.r.info("commandstats")  # type: ignore[assignment]
        calls = sum(float(v["calls"]) for k, v in stats.items() if "info" not in k)
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls

    async def step(self, name: str, run: Callable[[], Awaitable[Any]]) -> Any:
        cpu0, calls0 = self._read()
        out = await run()
        cpu1, calls1 = self._read()
        self.rows[name] = {"redis_cpu_usec_per_job": round(1e6 * (cpu1 - cpu0) / self.jobs, 1),
                           "commands_per_job": round((calls1 - calls0) / self.jobs, 2)}
        return out


async def _lifecycle(url: str, jobs: int, claim: int, finish: int) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    c = Client.from_url(url, queue=QUEUE, max_pending=10 * jobs)
    conn = connect_async(url)
    store = WorkerStore(conn, QUEUE, "steps")
    keys = QueueKeys.for_queue(QUEUE)
    wait_jobs = r.register_script(source("wait_jobs"))
    token = new_token()
    await store.ensure_groups()
    m = _Meter(r, jobs)
    reqs = [{"prompt": f"job {i}", "max_tokens": 16} for i in range(jobs)]

    async def submit() -> list[str]:
        return c.submit_many(reqs, chunk=100)

    ids: list[str] = await m.step("submit", submit)

    async def register() -> None:
        for i in range(0, jobs, 1000):
            k, a = register_args(keys, token, ids[i:i + 1000], 600)
            wait_jobs(keys=k, args=a)

    async def start() -> list[ClaimedJob]:
        rows: list[ClaimedJob] = []
        while len(rows) < jobs and (got := await store.start_jobs(claim)):
            rows += got
        return rows

    async def finish_all() -> None:
        for i in range(0, len(rows), finish):
            await asyncio.gather(*(store.finish(row, "succeeded", json.dumps(
                {"id": row.job_id, "status": "succeeded", "text": "x" * 64}), 3600)
                for row in rows[i:i + finish]))

    async def read() -> int:
        got = 0
        while got < jobs and (res := r.blmpop(1, 1, keys.waiter(token), direction="LEFT",
                                                count=1000)):
            got += len(res[1])
        return got

    await m.step("register", register)
    rows: list[ClaimedJob] = await m.step("start", start)
    await m.step("finish", finish_all)
    results = await m.step("read", read)
    await conn.aclose()
    c.close()
    if len(rows) != jobs or results != jobs:
        raise RuntimeError(f"{len(rows)} started, {results} results read, of {jobs} jobs")
    return {"jobs": jobs, "claim": claim, "finish": finish, "steps": m.rows,
            "redis_cpu_usec_per_job": round(sum(
                v["redis_cpu_usec_per_job"] for v in m.rows.values()), 1)}


def measure(jobs: int, claim: int, finish: int, aof: bool, log_dir: Path) -> dict[str, Any]:
    with RedisServer(appendfsync="everysec" if aof else None, workdir=str(log_dir)) as server:
        t0 = time.monotonic()
        out = asyncio.run(_lifecycle(server.url, jobs, claim, finish))
    return {**out, "aof": aof, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--claim", type=int, default=32, help="jobs per start_jobs call")
    ap.add_argument("--finish", type=int, default=16, help="finish_job calls per batch")
    ap.add_argument("--aof", action="store_true", help="appendfsync everysec, as redis_cost")
    a = ap.parse_args()
    print(json.dumps(measure(a.jobs, a.claim, a.finish, a.aof,
                             Path(tempfile.mkdtemp(prefix="slotfill-steps-"))), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
