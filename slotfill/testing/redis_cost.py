"""Redis commands and Redis CPU per job lifecycle (submit → result read), from
``INFO commandstats`` before and after a run of simulated jobs.

    python -m slotfill.testing.redis_cost --jobs 2000 [--stream] [--single] [--wait-many]

Starts its own redis-server and one simulated worker; submits ``--jobs`` jobs (``submit_many``
chunks of 100, or one ``submit`` each with ``--single``) and reads every result the way a
backend does (``wait``, one job after another; ``--wait-many``: one ``wait_many`` for all).
``all_commands``: every command Redis executed, those inside Lua scripts included
(``INFO commandstats``); ``--monitor`` also splits what clients sent from what scripts ran.
Redis CPU is ``INFO cpu`` (user + sys) before/after, per job; the worker's idle upkeep
(heartbeats, lease renewals) is included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from producer import Client
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer


def commandstats(r: redis.Redis) -> dict[str, dict[str, float]]:
    raw: dict[str, Any] = r.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): {"calls": float(v["calls"]), "usec": float(v["usec"])}
            for k, v in raw.items()}


def _cpu_s(r: redis.Redis) -> float:
    info: dict[str, Any] = r.info("cpu")  # type: ignore[assignment]
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class _Monitor(threading.Thread):
    """Counts the commands clients send (MONITOR marks those a script runs as ``lua``)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.top: Counter[str] = Counter()
        self.inner: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        r = redis.Redis(port=self.port, socket_timeout=0.5)
        with r.monitor() as m:  # type: ignore[no-untyped-call]
            while not self.stop.is_set():
                try:
                    cmd = m.next_command()
                except redis.TimeoutError:
                    continue
                name = str(cmd["command"]).split(" ", 1)[0].strip('"').lower()
                (self.inner if cmd.get("client_type") == "lua" else self.top)[name] += 1


def _lifecycle(c: Client, reqs: list[dict[str, Any]], single: bool, wait_many: bool) -> None:
    """Submit every job, then read every result."""
    ids = ([c.submit(request=q).id for q in reqs] if single
           else c.submit_many(reqs, chunk=100))
    if wait_many:
        c.wait_many(ids, timeout=120)
    else:
        for i in ids:
            c.wait(i, timeout=60)


def measure(jobs: int, stream: bool, single: bool, log_dir: Path,
            monitor: bool = False, wait_many: bool = False) -> dict[str, Any]:
    (log_dir / "redis").mkdir(parents=True, exist_ok=True)
    with RedisServer(appendfsync="everysec", workdir=str(log_dir / "redis")) as server:
        w = WorkerProcess(server.url, "cost", log_dir / "worker.log", queue="cost",
                          engine="sim", sim_step_ms=2, max_num_seqs=32, headroom=16,
                          heartbeat_seconds=5).start()
        try:
            w.wait_ready(60)
            r = redis.Redis(port=server.port)
            c = Client.from_url(server.url, queue="cost", max_pending=10 * jobs)
            reqs = [{"prompt": f"job {i}", "max_tokens": 16, "ignore_eos": True,
                     **({"stream": True} if stream else {})} for i in range(jobs)]
            c.wait(c.submit("warm-up", max_tokens=2).id, timeout=30)  # scripts loaded
            time.sleep(0.5)
            cpu0 = _cpu_s(r)
            r.config_resetstat()
            mon = _Monitor(server.port)
            if monitor:
                mon.start()
                time.sleep(0.3)
            t0 = time.monotonic()
            _lifecycle(c, reqs, single, wait_many)
            seconds = time.monotonic() - t0
            mon.stop.set()
            if monitor:
                mon.join(2)
            cpu = _cpu_s(r) - cpu0
            stats = commandstats(r)
            c.close()
        finally:
            w.stop(10)
    script_usec = sum(v["usec"] for k, v in stats.items() if k in ("evalsha", "eval"))
    direct_usec = sum(stats[k]["usec"] for k in mon.top if k in stats
                      and k not in mon.inner and k not in ("evalsha", "eval"))
    all_calls = sum(v["calls"] for k, v in stats.items() if k != "config|resetstat")
    out: dict[str, Any] = {
        "jobs": jobs, "stream": stream, "single_submit": single, "wait_many": wait_many,
        "seconds": round(seconds, 1),
        "all_commands_per_job": round(all_calls / jobs, 2),
        "all_by_name_per_job": {k: round(v["calls"] / jobs, 2) for k, v in sorted(
            stats.items(), key=lambda kv: -kv[1]["calls"]) if v["calls"] / jobs >= 0.01},
        "usec_by_name_per_job": {k: round(v["usec"] / jobs, 1) for k, v in sorted(
            stats.items(), key=lambda kv: -kv[1]["usec"]) if v["usec"] / jobs >= 0.1},
        "redis_cpu_usec_per_job": round(1e6 * cpu / jobs, 1),
        "command_usec_per_job": round((script_usec + direct_usec) / jobs, 1)}
    if not monitor:
        return out
    top_calls = sum(mon.top.values())
    return {**out, "note": "with MONITOR on, the CPU figures include its own cost",
            "client_commands_per_job": round(top_calls / jobs, 2),
            "client_commands_by_name_per_job": {k: round(n / jobs, 2)
                                         for k, n in mon.top.most_common()},
            "script_calls_inside_per_job": {k: round(n / jobs, 2)
                                            for k, n in mon.inner.most_common()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--single", action="store_true")
    ap.add_argument("--wait-many", action="store_true",
                    help="read the results with one wait_many instead of a wait per job")
    ap.add_argument("--monitor", action="store_true",
                    help="also split client commands from those scripts run (MONITOR)")
    a = ap.parse_args()
    out = measure(a.jobs, a.stream, a.single, Path(tempfile.mkdtemp(prefix="slotfill-cost-")),
                  a.monitor, a.wait_many)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
