"""Soak: many jobs through one worker on the step-simulating engine (``SLOTFILL_ENGINE=sim``).

Reports the worker process's RSS (psutil) at start, after a warm-up tenth of the jobs, and at
the end, plus its peak, and the worker's Redis commands per finished job (pull, finish, lease
renewals, heartbeats) in a window while the queue is deep and one while it is shallow.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.redis_server import bench_redis
from bench.redis_stats import command_calls, delta, per_job
from producer import Client, QueueKeys
from slotfill.testing.fleet import WorkerProcess

QUEUE = "soak"


def _finished(r: redis.Redis, keys: QueueKeys) -> int:
    stats: dict[bytes, bytes] = r.hgetall(keys.stats)  # type: ignore[assignment]
    return sum(int(v) for k, v in stats.items() if k.startswith(b"finished_"))


def run_soak(jobs: int = 100_000, slots: int = 256, headroom: int = 32, step_ms: float = 2.0,
             max_tokens: tuple[int, int] = (1, 8), seed: int = 0,
             progress: Callable[[str, int, int], None] = lambda s, d, t: None,
             workdir: str | None = None, boost: bool = True) -> dict[str, Any]:
    """Submit every job first, then start the worker: the queue drains from ``jobs`` to 0,
    so the two command windows (10-20 % and 80-90 % done) see only the worker's side."""
    import psutil  # type: ignore[import-untyped]

    wd = Path(workdir or tempfile.mkdtemp(prefix="slotfill-bench-soak-")).resolve()
    (wd / "redis").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with bench_redis(str(wd / "redis"), boost) as server:
        c = Client.from_url(server.url, queue=QUEUE)
        c.configure_queue(max_pending=jobs + 1)
        t = time.perf_counter()
        for i in range(0, jobs, 10_000):
            n = min(10_000, jobs - i)
            c.submit_many([{"prompt": "soak job", "max_tokens": rng.randint(*max_tokens),
                            "ignore_eos": True} for _ in range(n)])
            progress("soak: submitting", i + n, jobs)
        submit_s = time.perf_counter() - t
        c.close()
        w = WorkerProcess(server.url, "soak-worker", wd / "worker.log", queue=QUEUE,
                          engine="sim", sim_step_ms=step_ms, max_num_seqs=slots,
                          headroom=headroom).start()
        try:
            w.wait_ready(120)
            assert w.proc is not None
            proc = psutil.Process(w.proc.pid)
            out = _drive(server.url, w, proc, jobs, progress)
        finally:
            w.stop()
    out.update({"submit_jobs_s": jobs / submit_s, "sim": {"slots": slots, "headroom": headroom,
                                                          "step_ms": step_ms,
                                                          "max_tokens": list(max_tokens)}})
    return out


def _drive(url: str, w: WorkerProcess, proc: Any, jobs: int,
           progress: Callable[[str, int, int], None]) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    keys = QueueKeys.for_queue(QUEUE)
    rss: dict[str, int] = {"start": proc.memory_info().rss}
    samples: list[tuple[float, int, int]] = []
    t0 = time.time()
    done = 0
    # Command windows: while deep (10%..20% done) and while shallow (80%..90% done).
    marks = {0.1: "deep_start", 0.2: "deep_end", 0.8: "shallow_start", 0.9: "shallow_end"}
    snaps: dict[str, tuple[dict[str, int], int, int]] = {}
    while done < jobs:
        time.sleep(0.1)
        done = _finished(r, keys)
        for frac, name in marks.items():
            if name not in snaps and done >= frac * jobs:
                snaps[name] = (command_calls(r), done, jobs - done)
        m = proc.memory_info().rss
        samples.append((time.time() - t0, done, m))
        if "warm" not in rss and done >= 0.1 * jobs:
            rss["warm"] = m
        if w.proc is not None and w.proc.poll() is not None:
            raise RuntimeError(f"soak worker exited {w.proc.returncode}:\n{w.tail()}")
        progress("soak: running", done, jobs)
    elapsed = time.time() - t0
    rss["end"] = proc.memory_info().rss
    rss["peak"] = max(s[2] for s in samples)
    windows = {}
    for name in ("deep", "shallow"):
        a, b = snaps.get(f"{name}_start"), snaps.get(f"{name}_end")
        if a and b and b[1] > a[1]:
            d = per_job(delta(a[0], b[0]), b[1] - a[1])
            d["queue_depth"] = [a[2], b[2]]
            windows[name] = d
    stats: dict[bytes, bytes] = r.hgetall(keys.stats)  # type: ignore[assignment]
    r.close()
    mib = 1024 * 1024
    return {
        "jobs": jobs, "elapsed_s": elapsed, "jobs_s": jobs / elapsed,
        "rss_mib": {k: round(v / mib, 1) for k, v in rss.items()},
        "rss_growth_after_warmup_mib": round((rss["end"] - rss.get("warm", rss["start"])) / mib,
                                             1),
        "rss_samples": [(round(t, 2), d, round(m / mib, 1))
                        for t, d, m in samples[:: max(1, len(samples) // 200)]],
        "redis_per_job": windows,
        "finished": {k.decode(): int(v) for k, v in stats.items()},
        "engine": "sim",
    }
