"""Jobs flowing through simulated workers while something happens to Redis (a master killed,
a failover, memory full, a read-only master); then every acknowledged job is checked.

What is measured: ``recovery_s``, from the fault to the first probe job that a client
submits after the fault and sees finished; the invariants of
:func:`slotfill.testing.kill_soak.check_invariants` over every acknowledged submit; results
that changed after a client had read them; whether the workers stayed up.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer import Client
from producer.connection import connect
from producer.errors import QueueFull, RedisUnavailable, WaitTimeout
from producer.redis_errors import is_transient
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.kill_soak import Report, check_invariants, wait_all_terminal


@dataclass
class Outcome:
    report: Report
    acked: int = 0
    changed_after_read: int = 0
    read_before_fault: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """RedisUnavailable codes the submitter met (``""``: a lost connection or timeout)."""
    recovery_s: float | None = None
    workers_alive: bool = True
    worker_exit_codes: list[int | None] = field(default_factory=list)
    engine_dead_logged: int = 0

    def summary(self) -> dict[str, Any]:
        r = self.report
        return {"acked": self.acked, "lost": len(r.lost), "duplicate_visible":
                len(r.duplicate_visible), "wrong": len(r.wrong),
                "changed_after_read": self.changed_after_read,
                "read_before_fault": self.read_before_fault,
                "unfinished_entries": r.unfinished_entries, "statuses": r.statuses,
                "refused": dict(self.refused), "recovery_s": self.recovery_s,
                "workers_alive": self.workers_alive, "exit_codes": self.worker_exit_codes,
                "engine_dead_logged": self.engine_dead_logged, "notes": r.notes}


def _retrying(fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() > end:
                raise
            time.sleep(0.1)


class _Traffic:
    """A submitter and a reader thread against one queue."""

    def __init__(self, client: Client, seed: int = 7) -> None:
        self.client = client
        self.rng = random.Random(seed)
        self.acked: list[str] = []
        self.expected: dict[str, int] = {}
        self.seen: dict[str, str] = {}
        self.refused: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._submit, name="submitter"),
                        threading.Thread(target=self._read, name="reader")]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _submit(self) -> None:
        n = 0
        while not self.stop.is_set():
            reqs: list[dict[str, Any]] = [
                {"prompt": f"job {n + k}", "max_tokens": self.rng.randint(3, 10),
                 "ignore_eos": True} for k in range(20)]
            try:
                ids = self.client.submit_many(reqs)
            except RedisUnavailable as e:
                self.refused[e.code] += 1
                time.sleep(0.05)
                continue
            except QueueFull:
                time.sleep(0.1)
                continue
            with self.lock:
                self.acked.extend(ids)
                self.expected.update((i, int(q["max_tokens"])) for i, q in zip(ids, reqs,
                                                                               strict=True))
            n += len(ids)
            time.sleep(0.1)  # well inside what two simulated workers finish

    def _read(self) -> None:
        """Read recent results as a client would; remember the first version seen."""
        while not self.stop.is_set():
            with self.lock:
                recent = self.acked[-60:]
            for job_id in recent:
                if job_id in self.seen:
                    continue
                try:
                    res = self.client.result(job_id)
                except RedisUnavailable:
                    break
                if res is not None:
                    self.seen[job_id] = res.model_dump_json()
            time.sleep(0.05)


def _probe(client: Client, t_fault: float, timeout: float) -> float | None:
    """Seconds from the fault until a job submitted after it is seen finished."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            # High priority: it measures Redis coming back, not the backlog ahead of it.
            job = client.submit("probe", max_tokens=2, priority="high")
            client.wait(job.id, timeout=3.0)
            return round(time.time() - t_fault, 2)
        except (RedisUnavailable, WaitTimeout):
            time.sleep(0.05)
    return None


def run_with_fault(url: str, log_dir: Path, fault: Callable[[], None], *,
                   queue: str = "ha", workers: int = 2, before_s: float = 2.0,
                   after_s: float = 3.0, drain_s: float = 40.0,
                   client_settings: dict[str, Any] | None = None,
                   worker_settings: dict[str, str | int | float] | None = None) -> Outcome:
    """Workers and traffic on ``url``; ``fault()`` after ``before_s``; traffic for ``after_s``
    more; then every acknowledged job is read back (through ``url``, so through whatever
    master now serves it)."""
    settings: dict[str, str | int | float] = dict(
        queue=queue, engine="sim", sim_step_ms=5, max_num_seqs=8, headroom=4,
        lease_seconds=3, heartbeat_seconds=0.5, grace_seconds=3, **(worker_settings or {}))
    fleet = [WorkerProcess(url, f"ha{i}", log_dir / f"ha{i}.log", **settings).start()
             for i in range(workers)]
    client = Client.from_url(url, queue=queue, **(client_settings or {}))
    out = Outcome(Report())
    traffic = _Traffic(client)
    try:
        for w in fleet:
            w.wait_ready(60)
        traffic.start()
        time.sleep(before_s)
        out.read_before_fault = len(traffic.seen)
        t_fault = time.time()
        fault()
        out.recovery_s = _probe(client, t_fault, timeout=30.0)
        time.sleep(after_s)
        traffic.join()
        r = connect(url)
        ids = list(traffic.acked)
        if not _retrying(lambda: wait_all_terminal(r, queue, ids, drain_s), drain_s + 30):
            out.report.notes.append("timed out waiting for every job to finish")
        out.report = _retrying(lambda: check_invariants(r, queue, ids, traffic.expected))
        out.changed_after_read = _changed(client, traffic.seen)
        out.acked, out.refused = len(ids), traffic.refused
        out.workers_alive = all(w.proc is not None and w.proc.poll() is None for w in fleet)
        r.close()
    finally:
        traffic.join()
        out.worker_exit_codes = [w.stop(15) for w in fleet]
        out.engine_dead_logged = sum(w.log_path.read_text(errors="replace").count("engine dead")
                                     for w in fleet if w.log_path.exists())
        client.close()
    return out


def _changed(client: Client, seen: dict[str, str]) -> int:
    changed = 0
    for job_id, first in seen.items():
        now = _retrying(lambda j=job_id: client.result(j))  # type: ignore[misc]
        if now is None or now.model_dump_json() != first:
            changed += 1
    return changed


def wait_role(port: int, role: str, timeout: float = 30.0) -> None:
    """Until the server on ``port`` reports ``role`` (``master``/``slave``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if redis.Redis(port=port, socket_timeout=1.0).info("replication")["role"] == role:
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not {role} after {timeout}s")
