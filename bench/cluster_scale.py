"""Jobs/s and Redis CPU per job: one master vs a 3-master Redis Cluster (issue 13, item 7),
and one logical queue split into 3 shards over those 3 masters (issue 13, item 4).

    python -m bench.cluster_scale --jobs 6000 [--slots 128] [--step-ms 2] [--out FILE]

Rows "1" and "3": three queues, one simulated-engine worker each. An unsharded queue lives on
one master, so the 3-master run puts the three queues on the three masters, one each (the
names are picked by slot), and the 1-master run puts the same three queues on one standalone
redis-server (a cluster needs three masters). Row "3 sharded": one queue of 3 shards
(producer/shards.py) on the 3-master cluster, three workers of that one queue (their home
shards differ), three submitting threads on it. Each run: the workers start and report ready,
then one thread per queue submits its share (``submit_many``, chunks of 500) while the workers
drain; jobs/s is first submit → last job finished (the queues' ``finished_*`` counters);
then every result is read (one pipelined ``HGET`` each). Redis CPU is ``INFO cpu`` (user +
sys) summed over the masters, from before the first submit to after the last read, per job;
commands per job from ``INFO commandstats`` the same way (inside scripts included);
``busiest_master_core_share``: the busiest master's CPU seconds per second of the run.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from producer import Client, QueueKeys
from producer.connection import connect
from producer.queue_config import configure
from producer.shards import ShardLayout, read_layout
from slotfill.testing.cluster import LocalCluster
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer
from worker.shard_set import home_index

SHARDED_QUEUE = "sq"

OWN = ("info", "config|resetstat", "cluster|slots", "cluster|nodes", "ping", "hgetall")
"""What the bench itself sends while it watches (left out of the per-job counts)."""


def _cpu_each(nodes: list[redis.Redis]) -> list[float]:
    out = []
    for n in nodes:
        info: dict[str, Any] = n.info("cpu")  # type: ignore[assignment]
        out.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return out


def _calls(nodes: list[redis.Redis]) -> int:
    total = 0
    for n in nodes:
        stats: dict[str, Any] = n.info("commandstats")  # type: ignore[assignment]
        total += sum(int(v["calls"]) for k, v in stats.items()
                     if k.removeprefix("cmdstat_") not in OWN)
    return total


def spread_queues(n: int = 3) -> list[str]:
    """``n`` queue names whose slots fall in the ``n`` equal slot ranges ``redis-cli --cluster
    create`` gives ``n`` masters (checked against the live cluster in :func:`_masters`)."""
    out: dict[int, str] = {}
    for i in range(10_000):
        name = f"q{i}"
        part = key_slot(QueueKeys.for_queue(name).base.encode()) * n // 16384
        out.setdefault(part, name)
        if len(out) == n:
            return [out[k] for k in sorted(out)]
    raise LookupError("no queue names spread over the slot ranges")


def workers_with_homes(n: int) -> list[str]:
    """Worker names whose home shards (of ``n``) are 0, 1, ..., one each."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < n:
        found.setdefault(home_index(f"w{i}", n), f"w{i}")
        i += 1
    return [found[k] for k in range(n)]


@contextmanager
def _sharded(workdir: Path) -> Iterator[tuple[str, list[redis.Redis], ShardLayout]]:
    """A 3-master cluster holding one queue of 3 shards, one shard per master."""
    with LocalCluster(masters=3) as cluster:
        r = connect(cluster.url)
        configure(r, QueueKeys.for_queue(SHARDED_QUEUE), shards=3)
        layout = read_layout(r, SHARDED_QUEUE)
        r.close()
        ports = {cluster.master_of_key(k.base).port for k in layout.all_keys}
        assert len(ports) == 3, "the shards do not land on different masters"
        yield cluster.url, [redis.Redis(port=n.port) for n in cluster.nodes[:3]], layout


@contextmanager
def _masters(count: int, workdir: Path) -> Iterator[tuple[str, list[redis.Redis], list[str]]]:
    """(URL, a plain client per master, queue names) of a standalone server (1) or a cluster."""
    names = spread_queues(3)
    if count == 1:
        workdir.mkdir(parents=True, exist_ok=True)
        # Not reniced, as the cluster's nodes are not: the same footing.
        with RedisServer(appendfsync="everysec", workdir=str(workdir),
                         priority_boost=False) as server:
            yield server.url, [redis.Redis(port=server.port)], names
        return
    with LocalCluster(masters=count) as cluster:
        ports = {cluster.master_of_key(QueueKeys.for_queue(q).base).port for q in names}
        assert len(ports) == count, "the queues do not land on different masters"
        yield cluster.url, [redis.Redis(port=n.port) for n in cluster.nodes[:count]], names


@contextmanager
def _setup(masters: int, sharded: bool, workdir: Path
           ) -> Iterator[tuple[str, list[redis.Redis], list[ShardLayout], list[str]]]:
    """(URL, a client per master, the queues' layouts, one queue per worker and submitter)."""
    if sharded:
        with _sharded(workdir) as (url, nodes, layout):
            yield url, nodes, [layout], [layout.queue] * 3
        return
    with _masters(masters, workdir) as (url, nodes, names):
        yield url, nodes, [ShardLayout.single(q) for q in names], names


def run(masters: int, jobs: int, slots: int, step_ms: float, seed: int,
        workdir: Path, sharded: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    tag = f"m{masters}{'s' if sharded else ''}-"
    run_dir = Path(tempfile.mkdtemp(prefix=tag, dir=workdir))  # a fresh AOF each
    with _setup(masters, sharded, run_dir / "redis") as (url, nodes, layouts, queues):
        names = workers_with_homes(3) if sharded else [f"w-{q}" for q in queues]
        workers = [WorkerProcess(url, n, run_dir / f"{n}.log", queue=q,
                                 engine="sim", sim_step_ms=step_ms, max_num_seqs=slots,
                                 headroom=slots // 4, heartbeat_seconds=5).start()
                   for n, q in zip(names, queues, strict=True)]
        try:
            for w in workers:
                w.wait_ready(120)
            r = connect(url)
            share = jobs // len(queues)
            reqs = [[{"prompt": f"p{i}", "max_tokens": rng.randint(1, 8)}
                     for i in range(share)] for _ in queues]
            ids: list[list[str]] = [[] for _ in queues]
            cpu_each0, calls0 = _cpu_each(nodes), _calls(nodes)
            t0 = time.monotonic()

            def submit(i: int) -> None:
                with Client.from_url(url, queue=queues[i], max_pending=10 * jobs) as c:
                    ids[i] = c.submit_many(reqs[i], chunk=500)

            threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(queues))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            submitted_s = time.monotonic() - t0
            total = share * len(queues)
            physical = [k.queue for lay in layouts for k in lay.all_keys]
            while _finished(r, physical) < total:
                time.sleep(0.02)
            drain_s = time.monotonic() - t0
            ok = _read_all(r, layouts, queues, ids)
            per_master = [a - b for a, b in zip(_cpu_each(nodes), cpu_each0, strict=True)]
            cpu, calls = sum(per_master), _calls(nodes) - calls0
        finally:
            for w in workers:
                w.stop(30)
    return {"masters": masters, "sharded": sharded, "queues": physical, "jobs": total,
            "succeeded": ok,
            "submit_s": round(submitted_s, 2), "seconds": round(drain_s, 2),
            "jobs_per_s": round(total / drain_s), "redis_cpu_usec_per_job":
            round(1e6 * cpu / total, 1), "commands_per_job": round(calls / total, 2),
            "busiest_master_core_share": round(max(per_master) / drain_s, 3)}


def _finished(r: redis.Redis, names: list[str]) -> int:
    n = 0
    for q in names:
        stats: dict[bytes, bytes] = r.hgetall(QueueKeys.for_queue(q).stats)  # type: ignore[assignment]
        n += sum(int(v) for k, v in stats.items() if k.startswith(b"finished_"))
    return n


def _read_all(r: redis.Redis, layouts: list[ShardLayout], queues: list[str],
              ids: list[list[str]]) -> int:
    ok = 0
    by_queue = {lay.queue: lay for lay in layouts}
    for q, job_ids in zip(queues, ids, strict=True):
        layout = by_queue[q]
        for i in range(0, len(job_ids), 1000):
            pipe = r.pipeline(transaction=False)
            for j in job_ids[i:i + 1000]:
                pipe.hget(layout.for_job(j).job(j), "result")
            ok += sum(1 for res in pipe.execute()
                      if res is not None and b'"succeeded"' in res)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6000)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="slotfill-cluster-scale-"))
    rows = [run(m, a.jobs, a.slots, a.step_ms, a.seed + i, wd, sharded)
            for i in range(a.repeat) for m, sharded in ((1, False), (3, False), (3, True))]
    text = json.dumps(rows, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
