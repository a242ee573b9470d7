"""The feeder's refill logic, checked structurally on the step-simulating engine.

The simulated engine runs in the worker's own event loop (no busy engine processes; the
worker runs in-process, ``slotfill.testing.inproc``), so what is measured is the feeder:
with a backlog in Redis every slot is busy on nearly every step, and the worker never holds
more than its capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Client, JobResult, JobStatus, QueueKeys
from producer.keys import GROUP
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.redis_server import RedisServer

SLOTS, HEADROOM = 16, 4


def _starved_steps(steps_file: Path, results: list[JobResult], slots: int
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Every job succeeded; from the step log: all steps, the window from the first full
    batch to the last job's start (jobs were waiting in Redis all along; more than 200
    steps), and how many of its steps had a free slot while nothing waited in the engine."""
    assert all(res.status is JobStatus.succeeded for res in results)
    last_start = max(res.timings.started_at or 0 for res in results)
    steps = [json.loads(line) for line in steps_file.read_text().splitlines()]
    first_full = next(i for i, s in enumerate(steps) if s["running"] == slots)
    window = [s for s in steps[first_full:] if s["t"] <= last_start]
    assert len(window) > 200
    starved = sum(1 for s in window if s["running"] < slots and s["waiting"] == 0)
    return steps, window, starved


def _serve_backlog(w: InprocWorker, url: str, queue: str, seed: int, jobs: int,
                   max_tokens: tuple[int, int], timeout: float = 120,
                   beside: AbstractContextManager[object] | None = None) -> list[JobResult]:
    """Start ``w``, submit ``jobs`` jobs at once (outputs of ``max_tokens`` lo..hi tokens,
    seeded), wait for every result (with ``beside`` running meanwhile), then drain ``w``."""
    c = Client.from_url(url, queue=queue)
    try:
        w.start().wait_ready(60)
        rng = random.Random(seed)
        with beside or contextlib.nullcontext():
            ids = c.submit_many([{"prompt": "x", "max_tokens": rng.randint(*max_tokens)}
                                 for _ in range(jobs)])
            return [c.wait(i, timeout=timeout) for i in ids]
    finally:
        w.stop()
        c.close()


@contextlib.contextmanager
def _peak_pel(r: redis.Redis, queue: str, peak: dict[str, int]) -> Iterator[None]:
    """Sample the consumers' pending entries (the PEL) every 2 ms; the highest in ``peak``."""
    stop = threading.Event()
    stream = QueueKeys.for_queue(queue).stream("normal")

    def sample() -> None:
        while not stop.is_set():
            for c_info in r.xinfo_consumers(stream, GROUP):
                peak["pel"] = max(peak["pel"], int(c_info["pending"]))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()


@pytest.mark.parametrize("admission", ["fixed", "engine"])
def test_backlog_keeps_every_slot_busy(redis_server: RedisServer, r: redis.Redis,
                                       queue: str, tmp_path: Path, admission: str) -> None:
    steps_file = tmp_path / "steps.jsonl"
    w = InprocWorker(redis_server.url, "refill", queue=queue, engine="sim", sim_step_ms=4,
                     max_num_seqs=SLOTS, headroom=HEADROOM, step_log=str(steps_file),
                     admission=admission)
    peak = {"pel": 0}
    # ~700 engine steps of backlog (the window below needs more than 200).
    results = _serve_backlog(w, redis_server.url, queue, seed=3, jobs=500, max_tokens=(4, 40),
                             beside=_peak_pel(r, queue, peak))
    steps, window, starved = _starved_steps(steps_file, results, SLOTS)
    # The engine rule keeps the shallowest ready queue (what the engine reports waiting, no
    # more): with 4 ms steps in the test's own process (a sampler thread beside it) a few
    # steps more run dry than with a fixed headroom (18 of 674 once in CI at load 3).
    bound = 0.05 if admission == "engine" else 0.02
    assert starved / len(window) <= bound, (starved, len(window))
    assert max(s["running"] + s["waiting"] for s in steps) <= SLOTS + HEADROOM
    # Pending entries of this consumer: in the engine (<= capacity) plus results being
    # written (at most one capacity's worth more: worker/admission.py subtracts the rest).
    assert 0 < peak["pel"] <= 2 * (SLOTS + HEADROOM)


@pytest.mark.slow
def test_a_batch_where_many_finish_per_step_stays_full(
        redis_server: RedisServer, queue: str, tmp_path: Path) -> None:
    """~6 jobs finish per engine step (128 slots, outputs of 4..36 tokens), as ~4 do at 1,024
    slots on a GPU: a ready queue of a fixed 8 ran dry on ~20 % of the steps here; the default
    admission sizes it from the measured finish rate, so a free slot with jobs waiting in Redis
    stays rare. Counted from the step log (vLLM's accounting: the batch a step ran with, and
    what was left waiting), never timed."""
    slots = 128
    steps_file = tmp_path / "steps.jsonl"
    # 20 ms steps (a GPU's at 1,024 slots are ~40 ms): the same finishes per step in half
    # the time, and a Redis read is a larger share of a step, so no easier to keep full.
    w = InprocWorker(redis_server.url, "wide", queue=queue, engine="sim", sim_step_ms=20,
                     max_num_seqs=slots, headroom=8, step_log=str(steps_file))
    results = _serve_backlog(w, redis_server.url, queue, seed=5, jobs=2400, max_tokens=(4, 36),
                             timeout=300)
    _, window, free = _starved_steps(steps_file, results, slots)
    assert free / len(window) <= 0.05, (free, len(window))


def test_a_job_that_leaves_during_a_read_is_replaced_without_waiting_for_it(
        redis_server: RedisServer, queue: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A refill behind a read already on its way used to wait for that reply, then for its
    own read: now a second read overtakes, and what both ask for never exceeds the rule.
    Reads are slowed here (20 ms, five engine steps), so jobs finish while one is on its way."""
    from worker.store import WorkerStore

    plain = WorkerStore.start_jobs

    async def slow_start(self: WorkerStore, count: int) -> list[Any]:
        await asyncio.sleep(0.02)
        return await plain(self, count)

    monkeypatch.setattr(WorkerStore, "start_jobs", slow_start)
    steps_file = tmp_path / "steps.jsonl"
    w = InprocWorker(redis_server.url, "overtake", queue=queue, engine="sim", sim_step_ms=4,
                     max_num_seqs=SLOTS, headroom=HEADROOM, step_log=str(steps_file),
                     admission="fixed")
    results = _serve_backlog(w, redis_server.url, queue, seed=5, jobs=600, max_tokens=(2, 12))
    assert all(res.status is JobStatus.succeeded for res in results)
    reads = [json.loads(line) for line in
             (tmp_path / "steps.jsonl.reads.jsonl").read_text().splitlines()]
    spans = sorted((rd["t_issue"], rd["t_back"]) for rd in reads)
    overtaken = sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
    assert overtaken > 0, len(reads)
    steps = [json.loads(line) for line in steps_file.read_text().splitlines()]
    assert max(s["running"] + s["waiting"] for s in steps) <= SLOTS + HEADROOM
    assert max(s["held"] for s in steps) <= SLOTS + HEADROOM
