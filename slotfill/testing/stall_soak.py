#!/usr/bin/env python
"""Kills and stalls mixed, with streaming jobs and Celery callbacks; then check every job.

    .venv/bin/python -m slotfill.testing.stall_soak --events 20 --jobs 3000

Starts two redis-servers (the queue's, which it freezes, and a Celery broker it never
touches), a supervised fleet of step-simulating workers that send a callback for every job,
and a submitter. Every few seconds one event lands at random: ``kill`` (SIGKILL a worker, a
fresh one replaces it), ``freeze`` (SIGSTOP a worker for 1.5 to 3 leases) or ``stall``
(SIGSTOP redis-server for 3 to 7 s: past the lease, and past the 5 s socket timeout, so
replies of writes that landed are lost). At the end it reports, over every job: lost,
duplicate visible results, wrong results, stream/result mismatches (the invariant of
PROTOCOL.md, slotfill.testing.stream_check), and callbacks missing or sent twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import Client, QueueFull
from slotfill.testing.kill_soak import Fleet, check_invariants, wait_all_terminal
from slotfill.testing.redis_server import RedisServer
from slotfill.testing.stream_check import check_jobs

CALLBACK = {"celery_task": "backend.on_llm_result"}
REDELIVER_S = 15.0
"""Longer than any stall or freeze here (at most 7 s): only a worker killed between sending
a callback and confirming it can make it repeat."""


@dataclass
class StallReport:
    jobs: int = 0
    streaming_jobs: int = 0
    events: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicate_visible: int = 0
    wrong: int = 0
    stream_mismatches: int = 0
    callbacks_missing: int = 0
    callbacks_double: int = 0
    callbacks_unacknowledged: int = 0
    """Callbacks of jobs whose submit reply the soak's client lost in a stall (it never
    learned their ids): they ran, correctly; not counted as repeats."""
    re_executions: int = 0
    duplicates_suppressed: int = 0
    unfinished_entries: int = 0
    seconds: float = 0.0
    first_problems: dict[str, list[str]] = field(default_factory=dict)
    first_missing_callbacks: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.lost or self.duplicate_visible or self.wrong or self.stream_mismatches
                    or self.callbacks_missing or self.callbacks_double
                    or self.unfinished_entries)


def callbacks(broker: redis.Redis) -> Counter[str]:
    """Celery messages in the broker's default queue, by task id (``slotfill-<job id>``)."""
    out: Counter[str] = Counter()
    for raw in broker.lrange("celery", 0, -1):
        out[json.loads(raw)["headers"]["id"]] += 1
    return out


def _freeze(pid: int, seconds: float) -> None:
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    try:
        time.sleep(seconds)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _submit(client: Client, rng: random.Random, n: int, stream_share: float,
            tokens: tuple[int, int]) -> tuple[list[str], dict[str, int], set[str]]:
    reqs = [{"prompt": f"job {rng.random()}", "max_tokens": rng.randint(*tokens),
             "ignore_eos": True, "stream": rng.random() < stream_share, "callback": CALLBACK}
            for _ in range(n)]
    try:
        ids = client.submit_many(reqs)
        kept = reqs
    except QueueFull as e:
        ids = [i for i in (e.accepted or []) if i is not None]
        kept = [q for q, i in zip(reqs, e.accepted or [], strict=False) if i]
    except redis.RedisError:
        return [], {}, set()  # Redis frozen: nothing acknowledged, try again later
    expected = {i: int(str(q["max_tokens"])) for i, q in zip(ids, kept, strict=True)}
    return ids, expected, {i for i, q in zip(ids, kept, strict=True) if q["stream"]}


def soak(*, events: int, jobs: int, log_dir: Path, workers: int = 2, lease: float = 2.0,
         gap: tuple[float, float] = (2.0, 4.0), stream_share: float = 0.3,
         tokens: tuple[int, int] = (20, 200), seed: int = 1) -> StallReport:
    rng = random.Random(seed)
    rep = StallReport()
    t0 = time.monotonic()
    with RedisServer(appendfsync=None) as server, RedisServer(appendfsync=None) as broker_srv:
        broker_url = f"redis://127.0.0.1:{broker_srv.port}/0"
        r = redis.Redis.from_url(server.url)
        client = Client.from_url(server.url, queue="stall")
        fleet = Fleet(server.url, "stall", log_dir, workers, engine="sim", sim_step_ms=5,
                      max_num_seqs=16, headroom=8, lease_seconds=lease, heartbeat_seconds=0.5,
                      grace_seconds=5, stream_interval_ms=20, celery_broker_url=broker_url,
                      celery_redeliver_seconds=REDELIVER_S)
        ids: list[str] = []
        expected: dict[str, int] = {}
        streaming: set[str] = set()
        stop = threading.Event()
        phase = max(1.0, events * sum(gap) / 2)

        def submitter() -> None:
            batch = 25
            while len(ids) < jobs and not stop.is_set():
                new, exp, st = _submit(client, rng, min(batch, jobs - len(ids)), stream_share,
                                       tokens)
                ids.extend(new)
                expected.update(exp)
                streaming.update(st)
                time.sleep(phase / max(1, jobs / batch))

        kinds: Counter[str] = Counter()
        fleet.start()
        sub = threading.Thread(target=submitter, name="submitter")
        sub.start()
        try:
            for _ in range(events):
                time.sleep(rng.uniform(*gap))
                kinds[_event(fleet, server, rng, lease)] += 1
            sub.join()
            wait_all_terminal(r, "stall", ids, 300)
            fleet.restart_exited()
            fleet.wait_ready()
            sent = _wait_callbacks(broker_url, len(ids))
        finally:
            stop.set()
            sub.join()
            fleet.stop()
        base = check_invariants(r, "stall", ids, expected)
        streams = check_jobs(r, "stall", sorted(streaming))
    rep.jobs, rep.streaming_jobs, rep.events = len(ids), len(streaming), dict(kinds)
    _fill(rep, ids, sent, base, streams)
    rep.seconds = round(time.monotonic() - t0, 1)
    return rep


def _event(fleet: Fleet, server: RedisServer, rng: random.Random, lease: float) -> str:
    """One random event: kill a worker, freeze one, or freeze redis-server."""
    fleet.restart_exited()
    fleet.wait_ready()
    kind = rng.choice(["kill", "freeze", "stall"])
    slot = rng.randrange(len(fleet.workers))
    if kind == "kill":
        fleet.kill(slot)
    elif kind == "freeze":
        proc = fleet.workers[slot].proc
        assert proc is not None
        _freeze(proc.pid, rng.uniform(1.5, 3.0) * lease)
    else:
        assert server.proc is not None
        _freeze(server.proc.pid, rng.uniform(3.0, 7.0))
    return kind


def _wait_callbacks(broker_url: str, n: int) -> Counter[str]:
    """The callbacks sent, once ``n`` arrived or the time for a redelivery passed. Callbacks a
    killed worker never sent come from a live worker's sweep: call with the fleet up."""
    broker = redis.Redis.from_url(broker_url)
    end = time.monotonic() + 4 * REDELIVER_S
    while sum(callbacks(broker).values()) < n and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(REDELIVER_S / 2)  # a sweep that would repeat one has had its chance
    return callbacks(broker)


def _fill(rep: StallReport, ids: list[str], sent: Counter[str], base: Any,
          streams: Any) -> None:
    want = {f"slotfill-{i}" for i in ids}
    rep.lost, rep.duplicate_visible, rep.wrong = (len(base.lost), len(base.duplicate_visible),
                                                  len(base.wrong))
    rep.stream_mismatches = len(streams.problems)
    rep.callbacks_missing = len(want - set(sent))
    rep.first_missing_callbacks = sorted(want - set(sent))[:5]
    rep.callbacks_double = sum(1 for k, v in sent.items() if v > 1 and k in want)
    rep.callbacks_unacknowledged = sum(1 for k in sent if k not in want)
    rep.re_executions, rep.duplicates_suppressed = base.re_executions, base.duplicates_suppressed
    rep.unfinished_entries = base.unfinished_entries
    rep.first_problems = dict(list(streams.problems.items())[:5])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--stream-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log-dir", default="")
    a = ap.parse_args()
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="slotfill-stall-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rep = soak(events=a.events, jobs=a.jobs, log_dir=log_dir, workers=a.workers,
               lease=a.lease, stream_share=a.stream_share, seed=a.seed)
    out: dict[str, Any] = asdict(rep)
    out["log_dir"] = str(log_dir)
    print(json.dumps(out, indent=2))
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
