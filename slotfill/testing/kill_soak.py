#!/usr/bin/env python
"""Kill -9 workers again and again while jobs flow; then check that no job was lost.

    .venv/bin/python -m slotfill.testing.kill_soak --kills 50 --jobs 10000

Starts its own redis-server (or uses ``--redis-url``), a fleet of ``--workers`` step-simulating
workers (``SLOTFILL_ENGINE=sim``; ``--engine vllm`` for the real one), a submitter thread that
spreads ``--jobs`` jobs over the kill phase, and a killer that SIGKILLs a random worker (its
whole process group) every few seconds and restarts it under a new consumer name, keeping at
least one worker alive at all times. At the end the invariant checker reads every job back:

* lost: submitted, but no terminal result;
* duplicate visible: a second publish (a done list or the soak's watching waiter got more
  signals than the job is owed: slotfill/testing/signals.py);
* wrong: a result whose content does not match its request (the sim engine's output is a
  function of ``max_tokens``);
* re-executions: sum over jobs of (starts - 1), bounded by the entries the killed workers
  held at their deaths (each such entry can be started again once per kill).

The tests (tests/test_faults_soak.py) run the same code with fewer kills. Prints a JSON
report; exit code 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import Client, QueueFull, waiting
from producer.connection import connect
from producer.keys import GROUP
from producer.shards import read_layout
from slotfill.testing import signals
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer, unblock_stream_reads

# -- the invariant checker -----------------------------------------------------------------

@dataclass
class Report:
    submitted: int = 0
    completed: int = 0
    """Jobs with exactly one visible terminal result."""
    lost: list[str] = field(default_factory=list)
    duplicate_visible: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    re_executions: int = 0
    """Sum over jobs of (times started - 1)."""
    max_starts: int = 0
    duplicates_suppressed: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    unfinished_entries: int = 0
    """Entries still in the queue's streams after every job finished (should be 0)."""
    kills: int = 0
    held_at_kills: int = 0
    """Entries the killed workers held when they died: the bound on re-executions."""
    stolen_from_live: int = 0
    """Reclaims beyond the entries killed workers held: leases a live worker failed to renew
    in time (a process stalled past the lease; its late result is suppressed)."""
    lease_lost_logged: int = 0
    """"lease lost to a peer" lines in the workers' logs (stalled workers noticing)."""
    worker_exit_codes: dict[str, int | None] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ok(self, *, allow_failed: bool = False) -> bool:
        bad_status = any(s != "succeeded" for s in self.statuses) and not allow_failed
        return not (self.lost or self.duplicate_visible or self.wrong or bad_status
                    or self.unfinished_entries
                    or (self.kills and self.re_executions > self.held_at_kills))

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("lost", "duplicate_visible", "wrong"):
            d[k] = {"count": len(d[k]), "first": d[k][:5]}
        return d


def check_invariants(r: redis.Redis, queue: str, ids: list[str],
                     expected_tokens: dict[str, int] | None = None,
                     watch: str | None = None) -> Report:
    """Read every job of ``ids`` back (each from its shard, for a sharded queue) and count
    what the promises forbid. ``watch``: a waiter's token registered on the jobs as they
    were submitted (each job it saw running was pushed to it once: testing/signals.py)."""
    layout = read_layout(r, queue)
    rep = Report(submitted=len(ids))
    pushed = signals.pushes(r, layout.every_keys, watch)
    statuses: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        pipe = r.pipeline(transaction=False)
        for i in chunk:
            keys = layout.for_job(i)
            pipe.hmget(keys.job(i), *signals.fields(["status", "result", "attempts"]))
            pipe.llen(keys.done(i))
        replies = pipe.execute()
        for n, job_id in enumerate(chunk):
            (status, result, attempts, notify, waiters), done_len = replies[2 * n:2 * n + 2]
            starts = int(attempts or 0)
            rep.re_executions += max(0, starts - 1)
            rep.max_starts = max(rep.max_starts, starts)
            if result is None or status is None:
                rep.lost.append(job_id)
                continue
            bad = signals.problem(job_id, notify, waiters, done_len, pushed, watch)
            if bad:
                rep.duplicate_visible.append(job_id)
            res = json.loads(result)
            st = res["status"]
            statuses[st] += 1
            if res.get("error"):
                codes[res["error"]["code"]] += 1
            if res["id"] != job_id or st != status.decode():
                rep.wrong.append(job_id)
            elif (st == "succeeded" and expected_tokens is not None
                  and job_id in expected_tokens):
                want = expected_tokens[job_id]
                text = " ".join(f"t{k % 997}" for k in range(1, want + 1))
                if res["usage"]["completion_tokens"] != want or res["text"] != text:
                    rep.wrong.append(job_id)
            if not bad:
                rep.completed += 1
    rep.statuses, rep.error_codes = dict(statuses), dict(codes)
    stats: Counter[str] = Counter()
    for keys in layout.every_keys:
        raw: dict[bytes, bytes] = r.hgetall(keys.stats)  # type: ignore[assignment]
        stats.update({k.decode(): int(v) for k, v in raw.items()})
    rep.duplicates_suppressed = stats.get("duplicates_suppressed", 0)
    rep.reclaimed = stats.get("reclaimed", 0)
    rep.dead_lettered = stats.get("dead_lettered", 0)
    rep.unfinished_entries = sum(int(r.xlen(s)) for k in layout.every_keys for s in k.streams)
    return rep


def wait_all_terminal(r: redis.Redis, queue: str, ids: list[str], timeout: float) -> bool:
    """Until every job has a result, or the timeout; a sweep a stalled Redis left unanswered reruns."""
    layout = read_layout(r, queue)
    left = list(ids)
    end = time.monotonic() + timeout
    while left and time.monotonic() < end:
        pipe = r.pipeline(transaction=False)
        for i in left:
            pipe.hexists(layout.for_job(i).job(i), "result")
        with contextlib.suppress(redis.TimeoutError, redis.ConnectionError):
            left = [i for i, done in zip(left, pipe.execute(), strict=True) if not done]
        if left:
            time.sleep(0.2)
    return not left


def held_by(r: redis.Redis, queue: str, consumer: str) -> int:
    """Entries pending (delivered, unacknowledged) under one consumer, on every shard."""
    n = 0
    for stream in (s for k in read_layout(r, queue).every_keys for s in k.streams):
        try:
            for c in r.xinfo_consumers(stream, GROUP):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name == consumer:
                    n += int(c["pending"])
        except redis.ResponseError:
            pass
    return n


# -- a supervised fleet --------------------------------------------------------------------

class Fleet:
    """Worker processes that this object restarts (as a supervisor would) under fresh
    consumer names. ``settings`` become SLOTFILL_* variables."""

    def __init__(self, redis_url: str, queue: str, log_dir: Path, n: int,
                 **settings: str | int | float) -> None:
        self.redis_url, self.queue, self.log_dir = redis_url, queue, Path(log_dir)
        self.settings = {"queue": queue, **settings}
        self.generation = 0
        self.workers: list[WorkerProcess] = [self._new(i) for i in range(n)]
        self.exit_codes: dict[str, int | None] = {}

    def _new(self, slot: int) -> WorkerProcess:
        self.generation += 1
        name = f"w{slot}-g{self.generation}"
        return WorkerProcess(self.redis_url, name, self.log_dir / f"{name}.log",
                             **self.settings)

    def start(self, timeout: float = 120.0, wait: bool = True) -> Fleet:
        """Start every worker; with ``wait``, until each is ready."""
        for w in self.workers:
            w.start()
        for w in self.workers if wait else ():
            w.wait_ready(timeout)
        return self

    def kill(self, slot: int) -> WorkerProcess:
        """SIGKILL worker ``slot`` (and its engine processes); start its replacement."""
        old = self.workers[slot]
        old.kill()
        self.exit_codes[old.consumer] = old.proc.returncode if old.proc else None
        self.workers[slot] = self._new(slot).start()
        return old

    def restart_exited(self) -> list[tuple[str, int | None]]:
        """Supervisor duty: restart every worker that exited; returns (name, exit code)."""
        gone = []
        for slot, w in enumerate(self.workers):
            if w.proc is not None and w.proc.poll() is not None:
                gone.append((w.consumer, w.proc.returncode))
                self.exit_codes[w.consumer] = w.proc.returncode
                self.workers[slot] = self._new(slot).start()
        return gone

    def wait_ready(self, timeout: float = 120.0) -> None:
        for w in self.workers:
            w.wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every worker at once (they drain in parallel), then wait; SIGKILL what
        overstays. One SIGTERM each: a second one may land after a drained worker restored
        the default handler on its way out."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(15)
        end = time.monotonic() + timeout
        # An idle worker's blocking read would hold its drain up to 2 s: end those reads.
        while any(w.proc is not None and w.proc.poll() is None for w in self.workers) \
                and time.monotonic() < end:
            unblock_stream_reads(self.redis_url)
            time.sleep(0.05)
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
            self.exit_codes[w.consumer] = w.proc.returncode
        return self.exit_codes


# -- the soak ------------------------------------------------------------------------------

def _submit_spread(client: Client, rng: random.Random, jobs: int, tokens: tuple[int, int],
                   phase: float, stop: threading.Event, ids: list[str],
                   expected: dict[str, int], watch: str) -> None:
    """Submit ``jobs`` jobs in batches of 25 spread over ``phase`` seconds (until ``stop``),
    appending their ids to ``ids`` and their output length to ``expected``."""
    batch = 25
    per_batch_s = phase / max(1, jobs / batch)
    sent = 0
    while sent < jobs and not stop.is_set():
        n = min(batch, jobs - sent)
        reqs = [{"prompt": f"job {sent + k}", "max_tokens": rng.randint(*tokens),
                 "ignore_eos": True} for k in range(n)]
        try:
            new = client.submit_many(reqs)
        except QueueFull as e:  # backpressure: keep what went in, retry the rest
            new = [i for i in (e.accepted or []) if i is not None]
            reqs = [q for q, i in zip(reqs, e.accepted or [], strict=False) if i]
            time.sleep(0.2)
        for i, q in zip(new, reqs, strict=True):
            expected[i] = int(str(q["max_tokens"]))
        signals.watch(client.redis, client.layout(), watch, new)
        ids.extend(new)
        sent += len(new)
        time.sleep(per_batch_s)


def _kill_one(fleet: Fleet, r: redis.Redis, queue: str, rng: random.Random, rep: Report) -> str:
    """SIGKILL one worker (one holding jobs, when any does) and start its replacement;
    returns the victim's name."""
    fleet.wait_ready()  # every worker up: one stays alive whoever dies
    loaded = [s for s, w in enumerate(fleet.workers) if held_by(r, queue, w.consumer) > 0]
    slot = rng.choice(loaded or list(range(len(fleet.workers))))
    victim = fleet.workers[slot]
    victim.kill()
    rep.held_at_kills += held_by(r, queue, victim.consumer)
    fleet.exit_codes[victim.consumer] = victim.proc.returncode if victim.proc else None
    fleet.workers[slot] = fleet._new(slot).start()
    rep.kills += 1
    return victim.consumer


def soak(redis_url: str, queue: str, *, kills: int, jobs: int, log_dir: Path,
         workers: int = 2, lease: float = 2.0, kill_gap: tuple[float, float] = (2.0, 3.5),
         slots: int = 8, headroom: int = 4, step_ms: float = 5.0,
         tokens: tuple[int, int] = (4, 40), engine: str = "sim", seed: int = 1,
         max_deliveries: int = 3, drain_timeout: float = 300.0,
         extra: dict[str, str | int | float] | None = None,
         progress: bool = False, shards: int = 1) -> Report:
    rng = random.Random(seed)
    r = connect(redis_url)
    client = Client.from_url(redis_url, queue=queue)
    if shards > 1:  # before any worker starts: every worker reads the layout at its start
        client.configure_queue(shards=shards)
    settings: dict[str, str | int | float] = dict(
        engine=engine, sim_step_ms=step_ms, max_num_seqs=slots, headroom=headroom,
        lease_seconds=lease, max_deliveries=max_deliveries, heartbeat_seconds=0.5,
        grace_seconds=5, **(extra or {}))
    fleet = Fleet(redis_url, queue, log_dir, workers, **settings)
    rep = Report()
    ids: list[str] = []
    expected: dict[str, int] = {}
    t0 = time.monotonic()
    phase = max(1.0, kills * sum(kill_gap) / 2)
    stop = threading.Event()
    watch = waiting.new_token()

    def submitter() -> None:
        _submit_spread(client, rng, jobs, tokens, phase, stop, ids, expected, watch)

    fleet.start()
    sub = threading.Thread(target=submitter, name="submitter")
    sub.start()
    try:
        for k in range(kills):
            time.sleep(rng.uniform(*kill_gap))
            victim = _kill_one(fleet, r, queue, rng, rep)
            if progress:
                print(f"kill {k + 1}/{kills}: {victim}; submitted {len(ids)}",
                      file=sys.stderr, flush=True)
        sub.join()
        if not wait_all_terminal(r, queue, ids, drain_timeout):
            rep.notes.append("timed out waiting for every job to finish")
        fleet.wait_ready()  # a SIGTERM before its handlers are installed is no drain
    finally:
        stop.set()
        sub.join()
        codes = fleet.stop()
    checked = check_invariants(r, queue, ids, expected if engine == "sim" else None, watch)
    checked.kills, checked.held_at_kills = rep.kills, rep.held_at_kills
    checked.stolen_from_live = max(0, checked.reclaimed - rep.held_at_kills)
    checked.lease_lost_logged = sum(f.read_text(errors="replace").count("lease lost to a peer")
                                    for f in Path(log_dir).glob("*.log"))
    checked.worker_exit_codes = codes
    checked.notes = rep.notes
    checked.seconds = round(time.monotonic() - t0, 1)
    r.close()
    client.close()
    return checked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--headroom", type=int, default=8)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--min-gap", type=float, default=2.0)
    ap.add_argument("--max-gap", type=float, default=3.5)
    ap.add_argument("--engine", default="sim")
    ap.add_argument("--max-deliveries", type=int, default=3)
    ap.add_argument("--redis-url", default="")
    ap.add_argument("--queue", default="soak")
    ap.add_argument("--log-dir", default="")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shards", type=int, default=1, help="split the queue into N shards")
    a = ap.parse_args()
    server = None
    url = a.redis_url
    if not url:
        server = RedisServer(appendfsync="everysec").start()
        url = server.url
    log_dir = Path(a.log_dir or tempfile.mkdtemp(prefix="slotfill-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        rep = soak(url, a.queue, kills=a.kills, jobs=a.jobs, log_dir=log_dir,
                   workers=a.workers, lease=a.lease, kill_gap=(a.min_gap, a.max_gap),
                   slots=a.slots, headroom=a.headroom, step_ms=a.step_ms, engine=a.engine,
                   seed=a.seed, max_deliveries=a.max_deliveries, progress=True,
                   shards=a.shards)
    finally:
        if server is not None:
            server.stop()
    out = rep.summary()
    out["log_dir"] = str(log_dir)
    print(json.dumps(out, indent=2))
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
