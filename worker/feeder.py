"""Keep the engine full: pull jobs the moment capacity frees, run them, publish results.

Capacity = engine slots + headroom. The pull loop is event-driven: a finishing job sets
``_slot_freed``; with capacity free it reads at once, and only blocks (on Redis, not a timer)
when the queue is empty.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from producer.errors import EngineDead, ErrorCode, InvalidRequest
from producer.schema import JobRequest, JobStatus
from worker import results
from worker.engine import Engine
from worker.settings import WorkerSettings
from worker.store import Row, WorkerStore

log = logging.getLogger("slotfill.worker")

IDLE_BLOCK_S = 2.0
"""Longest blocking read while the queue is empty (wakes earlier on any new entry)."""


@dataclass
class InFlight:
    row: Row
    task: asyncio.Task[None]
    started_at: float
    abort_reason: JobStatus | None = None
    deadline_handle: asyncio.TimerHandle | None = None
    publishing: bool = False
    """Out of the engine, result not yet written: holds no engine capacity."""


@dataclass
class Counters:
    results: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    output_tokens: int = 0
    max_in_flight: int = 0

    def count(self, status: str) -> None:
        self.results[status] = self.results.get(status, 0) + 1


class Feeder:
    def __init__(self, engine: Engine, store: WorkerStore, settings: WorkerSettings) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.capacity = settings.max_num_seqs + settings.headroom
        self.in_flight: dict[str, InFlight] = {}
        self.counters = Counters()
        self.pulling = True
        self.fatal: BaseException | None = None
        self.dead = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._aborts: set[asyncio.Task[None]] = set()
        self._publishing = 0
        self.on_published: list[Callable[[Row, str, str], None]] = []
        """Called with (row, status, result JSON) after a result is published (metrics,
        completion callbacks). Must not block: schedule I/O as a task."""

    @property
    def free(self) -> int:
        """Places to fill. A job whose generation ended frees its place at once, before its
        result is written: measured here, a publish round trip occasionally took ~100 ms
        under load and held slots idle meanwhile. Unwritten results beyond one capacity's
        worth do count, so a slow Redis slows pulling instead of piling up results."""
        backlog = max(0, self._publishing - self.capacity)
        return self.capacity - (len(self.in_flight) - self._publishing) - backlog

    def _out_of_engine(self, flight: InFlight) -> None:
        if not flight.publishing:
            flight.publishing = True
            self._publishing += 1
            self.engine.stats.held = len(self.in_flight) - self._publishing
            self._slot_freed.set()

    async def run(self) -> None:
        """Pull until ``stop_pulling`` or engine death."""
        while self.pulling and self.fatal is None:
            if self.free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            want = self.free
            rows = await self.store.start_jobs(want)
            self.engine.stats.backlog = len(rows) >= want
            if rows:
                self.launch(rows)
            else:
                await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        waiter = asyncio.ensure_future(self.store.wait_for_work(IDLE_BLOCK_S))
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({waiter, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, freed):
                t.cancel()
            await asyncio.gather(waiter, freed, return_exceptions=True)

    def stop_pulling(self) -> None:
        self.pulling = False
        self._slot_freed.set()

    def launch(self, rows: list[Row]) -> None:
        if not self.in_flight:
            # The hang watchdog measures from the last step; an idle engine made none.
            self.engine.stats.last_step_at = time.monotonic()
        for row in rows:
            key = row.job_id or f"entry:{row.stream}:{row.entry}"
            if key in self.in_flight:
                continue  # our own lease renewal raced a reclaim: it already runs here
            task = asyncio.create_task(self._run(row), name=f"job-{key}")
            self.in_flight[key] = InFlight(row, task, time.time())
        held = len(self.in_flight) - self._publishing
        self.counters.max_in_flight = max(self.counters.max_in_flight, held)
        self.engine.stats.held = held

    async def _run(self, row: Row) -> None:
        key = row.job_id or f"entry:{row.stream}:{row.entry}"
        try:
            await self._run_row(row, self.in_flight[key])
        except EngineDead as e:
            self.die(e)
        except Exception as e:  # a bug in our code: fail loudly, keep the job for a retry
            log.exception("job %s crashed the feeder's job task", row.job_id)
            self.die(e)
        finally:
            flight = self.in_flight.pop(key, None)
            if flight and flight.deadline_handle:
                flight.deadline_handle.cancel()
            if flight and flight.publishing:
                self._publishing -= 1
            self.engine.stats.held = len(self.in_flight) - self._publishing
            self._slot_freed.set()

    def die(self, e: BaseException) -> None:
        if self.fatal is None:
            self.fatal = e
            self.pulling = False
            self.dead.set()
            self._slot_freed.set()

    async def _run_row(self, row: Row, flight: InFlight) -> None:
        s = self.settings
        if row.flag == "malformed":
            await self._guard(self.store.dead_letter_entry(row, "malformed entry: no job id"))
            self.counters.dead_lettered += 1
            return
        t0 = row.queued_at
        if row.flag in ("cancel", "expired"):
            status = JobStatus.cancelled if row.flag == "cancel" else JobStatus.expired
            msg = "cancelled before it ran" if row.flag == "cancel" else "deadline passed before start"
            await self._publish(row, status, results.failure(
                row, status.value, msg, s.consumer, results.timings(t0, None), status))
            return
        if row.deliveries > s.max_deliveries:
            await self._publish(row, JobStatus.failed, results.failure(
                row, ErrorCode.poisoned, f"delivered {row.deliveries} times (limit "
                f"{s.max_deliveries}); moved to the dead-letter stream", s.consumer,
                results.timings(t0, None)), dead_reason="poisoned")
            self.counters.dead_lettered += 1
            return
        try:
            req = results.parse_request(row)
            self._arm_deadline(flight, req)
            gen = await self.engine.generate(row.job_id, req)
            self._out_of_engine(flight)
        except InvalidRequest as e:
            self._out_of_engine(flight)
            await self._publish(row, JobStatus.failed, results.failure(
                row, e.code, str(e), s.consumer, results.timings(t0, flight.started_at)))
            return
        if self.fatal is not None or (gen.aborted and flight.abort_reason is None):
            return  # aborted by our own shutdown: leave the entry for a peer
        status = flight.abort_reason or JobStatus.succeeded
        self.counters.output_tokens += gen.completion_tokens
        await self._publish(row, status, results.from_generation(
            row, gen, status, s.consumer,
            results.timings(t0, flight.started_at, gen.first_token_at)))

    def _arm_deadline(self, flight: InFlight, req: JobRequest) -> None:
        if req.deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, req.deadline - time.time())
        flight.deadline_handle = loop.call_later(delay, self.abort, flight.row.job_id,
                                                 JobStatus.expired)

    def abort(self, job_id: str, reason: JobStatus) -> None:
        """Abort a running job in the engine; its result gets status ``reason``."""
        flight = self.in_flight.get(job_id)
        if flight is None or flight.abort_reason is not None:
            return
        flight.abort_reason = reason
        task = asyncio.create_task(self.engine.abort(job_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _publish(self, row: Row, status: JobStatus, result_json: str,
                       dead_reason: str = "") -> None:
        published = await self._guard(self.store.finish(
            row, status.value, result_json, self.settings.result_ttl, dead_reason))
        if published:
            self.counters.count(status.value)
            log.info("job %s %s", row.job_id, status.value)
            for listener in self.on_published:
                listener(row, status.value, result_json)
        else:
            self.counters.duplicates += 1
            log.info("job %s: duplicate result suppressed", row.job_id)

    @staticmethod
    async def _guard(coro: object) -> bool:
        # The finishing write must complete even if our task is cancelled mid-way (shutdown):
        # a half-seen reply would leave us unsure whether the job is done.
        return bool(await asyncio.shield(coro))  # type: ignore[arg-type]

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for in-flight jobs; abort the rest without publishing
        (they stay pending for a peer to reclaim). Returns how many were handed back."""
        self.stop_pulling()
        tasks = [f.task for f in self.in_flight.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        left = list(self.in_flight.values())
        for f in left:
            f.task.cancel()
        await asyncio.gather(*(f.task for f in left), return_exceptions=True)
        return len(left)
