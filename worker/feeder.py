"""Keep the engine full: pull jobs the moment capacity frees, run them, publish results.

How many jobs each read takes is worker/admission.py's rule (the engine's free slots plus a
small ready queue, counted in jobs and in prompt tokens, held back when its KV cache runs
full). The pull loop is event-driven: a finishing job or an engine step that lets admission
take more sets ``_slot_freed``; it then reads at once, and only blocks (on Redis, not a
timer) when the queue is empty.

Reliability duties that live here, beside the hot path:

* Reclaim: every sweep period (``upkeep.reclaim`` sets ``reclaim_due``) the pull loop first
  takes over entries idle past the lease, before it reads new ones, so a dead peer's jobs are
  picked up even while this worker is saturated.
* Culprit isolation: a reclaimed row flagged ``solo`` (its engine died while it was inside, or
  it has been delivered ``max_deliveries`` times) runs alone: the loop stops taking work, lets
  the engine empty, marks the run in Redis, runs that row by itself, then resumes. Only a job
  lost while alone is charged for it, so only the real poison is dead-lettered.
* Engine death: nothing more is pulled or acknowledged; the jobs that were inside the engine
  are marked ``suspect`` (and, when one was alone inside, it is charged the loss) and given
  back for a peer's next reclaim sweep; then ``dead`` is set and the worker exits.
* Results are written even through a Redis outage (retried until Redis answers).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from producer.errors import EngineDead, ErrorCode, InvalidRequest
from producer.schema import JobRequest, JobStatus
from worker import results
from worker.admission import Admission
from worker.engines.base import Engine, Generation
from worker.settings import WorkerSettings
from worker.store import HARD_DELIVERY_FACTOR, REDIS_ERRORS, SOLO_LOSS_LIMIT, Row, WorkerStore
from worker.token_stream import TokenStreamer

log = logging.getLogger("slotfill.worker")

IDLE_BLOCK_S = 2.0
"""Longest blocking read while the queue is empty (wakes earlier on any new entry)."""
ENGINE_ERROR_LIMIT = 3
"""Consecutive unexpected engine errors (each fails its own job, retryable) after which the
engine is treated as dead: an engine that fails everything must not eat the queue."""
CRASH_REPORT_TIMEOUT_S = 3.0
_REPORT_ERRORS: tuple[type[Exception], ...] = (asyncio.TimeoutError, *REDIS_ERRORS)
FORGET_CONSUMERS_AFTER_S = 3600.0
"""Consumers (dead workers) silent this long with nothing pending leave the group."""


@dataclass
class InFlight:
    row: Row
    task: asyncio.Task[None]
    started_at: float
    abort_reason: JobStatus | None = None
    deadline_handle: asyncio.TimerHandle | None = None
    publishing: bool = False
    """Out of the engine, result not yet written: holds no engine capacity."""
    prompt_tokens: int = 0
    """Estimated at read time (worker/admission.py): what it costs the engine to start."""


@dataclass
class Counters:
    results: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    output_tokens: int = 0
    max_in_flight: int = 0
    solo_runs: int = 0
    """Rows run alone in the engine (culprit isolation)."""
    leases_lost: int = 0
    """In-flight entries a peer took over (this worker was too slow to renew)."""
    released: int = 0
    """Entries given back unfinished (drain past the grace period, engine death)."""
    publish_retries: int = 0
    """Result writes retried because Redis was unavailable."""

    def count(self, status: str) -> None:
        self.results[status] = self.results.get(status, 0) + 1


class Feeder:
    def __init__(self, engine: Engine, store: WorkerStore, settings: WorkerSettings) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.admission = Admission(settings, engine.stats, engine.slots,
                                   finished=lambda: sum(self.counters.results.values()))
        self.capacity = self.admission.capacity
        engine.stats.on_step = self._on_step
        self._parked = False
        """The pull loop waits because admission said to read nothing."""
        self.in_flight: dict[str, InFlight] = {}
        self.counters = Counters()
        self.streamer = TokenStreamer(store, settings.stream_interval_ms,
                                      settings.stream_max_entries, settings.result_ttl)
        """Writes streaming jobs' output; its ``run`` is one of the worker's tasks."""
        self.pulling = True
        self.fatal: BaseException | None = None
        self.dead = asyncio.Event()
        self.reclaim_due = False
        self._slot_freed = asyncio.Event()
        self._aborts: set[asyncio.Task[None]] = set()
        self._publishing = 0
        self._solo_waiting: deque[Row] = deque()
        """Claimed rows that must run alone, not launched yet (held in our PEL)."""
        self._solo_key: str | None = None
        """In-flight key of the row running alone, if any."""
        self._engine_errors = 0
        self._cancels_seen: OrderedDict[str, float] = OrderedDict()
        """Cancellations heard for jobs not (yet) in flight: a cancel can overtake the reply
        that hands us its job."""
        self.on_published: list[Callable[[Row, str, str], None]] = []
        """Called with (row, status, result JSON) after a result is published (metrics,
        completion callbacks). Must not block: schedule I/O as a task."""
        self.on_started: list[Callable[[Row], None]] = []
        """Called with each row this worker starts (pulled or reclaimed; not malformed ones).
        Must not block."""

    @property
    def free(self) -> int:
        """Jobs to read now (worker/admission.py). A job whose generation ended frees its
        place at once, before its result is written: measured here, a publish round trip
        occasionally took ~100 ms under load and held slots idle meanwhile."""
        newest_first = (f.prompt_tokens for f in reversed(self.in_flight.values())
                        if not f.publishing)
        return self.admission.want(self.in_engine, self._publishing, newest_first)

    @property
    def in_engine(self) -> int:
        """Held jobs not yet out of the engine (including ones about to be checked)."""
        return len(self.in_flight) - self._publishing

    def held_rows(self) -> list[Row]:
        """Every entry this worker holds: in flight, and solo rows waiting their turn."""
        return [f.row for f in self.in_flight.values()] + list(self._solo_waiting)

    def _out_of_engine(self, flight: InFlight) -> None:
        if not flight.publishing:
            flight.publishing = True
            self._publishing += 1
            self.engine.stats.held = self.in_engine
            self._slot_freed.set()

    # -- pull loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Pull until ``stop_pulling`` or engine death."""
        while self.pulling and self.fatal is None:
            if self._solo_waiting or self._solo_key is not None:
                if self._solo_key is None and self.in_engine == 0:
                    await self._launch_solo()
                await self._wait_slot()
                continue
            if self.free <= 0:
                self._parked = True
                await self._wait_slot()
                self._parked = False
                continue
            if self.reclaim_due:
                self.reclaim_due = False
                self.engine.stats.reading = True
                try:
                    rows = await self.store.reclaim_jobs(
                        self.free, self.settings.lease_seconds, self.settings.max_deliveries,
                        solo_allowed=True, forget_after_s=FORGET_CONSUMERS_AFTER_S)
                finally:
                    self.engine.stats.reading = False
                if rows:
                    self._take_reclaimed(rows)
                    continue
            want = self.free
            self.engine.stats.reading = True
            t_read = time.monotonic()
            try:
                rows = await self.store.start_jobs(want)
            finally:
                self.engine.stats.reading = False
            self.admission.read_took(time.monotonic() - t_read)
            self.engine.stats.backlog = len(rows) >= want
            if rows:
                self.launch(rows)
            else:
                await self._wait_for_work()
        if self.fatal is not None:
            await self.dead.wait()  # the crash report is written before the worker exits

    def _on_step(self) -> None:
        if self._parked and self.free > 0:
            self._slot_freed.set()

    async def _wait_slot(self) -> None:
        self._slot_freed.clear()
        await self._slot_freed.wait()

    async def _wait_for_work(self) -> None:
        waiter = asyncio.ensure_future(self.store.wait_for_work(IDLE_BLOCK_S))
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({waiter, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, freed):
                t.cancel()
            await asyncio.gather(waiter, freed, return_exceptions=True)
        self._slot_freed.clear()

    def request_reclaim(self) -> None:
        """A reclaim sweep is due: the pull loop does it before its next read."""
        self.reclaim_due = True
        self._slot_freed.set()

    def stop_pulling(self) -> None:
        self.pulling = False
        self._slot_freed.set()

    def _take_reclaimed(self, rows: list[Row]) -> None:
        self.counters.reclaimed += len(rows)
        fresh = []
        for r in rows:
            log.info("job %s reclaimed (delivery %d%s)", r.job_id, r.deliveries,
                     ", runs alone" if r.solo else "")
            if r.key in self.in_flight or any(s.key == r.key for s in self._solo_waiting):
                continue  # our own entry (our renewal was late): it already runs here
            if r.solo:
                self._solo_waiting.append(r)
            else:
                fresh.append(r)
        if fresh:
            self.launch(fresh)

    async def _launch_solo(self) -> None:
        await self.store.mark_solo_run(self._solo_waiting[0])
        if not self._solo_waiting or self.in_engine:
            return  # a cancel or a lost lease took it meanwhile; or the engine got busy
        row = self._solo_waiting.popleft()
        self.counters.solo_runs += 1
        log.info("job %s runs alone in the engine (delivery %d)", row.job_id, row.deliveries)
        self._solo_key = row.key
        self.launch([row])

    def launch(self, rows: list[Row]) -> None:
        if self.in_engine == 0:
            # The hang watchdog measures from the last step; an idle engine made none.
            self.engine.stats.last_step_at = time.monotonic()
        for row in rows:
            key = row.key
            if key in self.in_flight:
                continue  # our own lease renewal raced a reclaim: it already runs here
            if row.flag == "" and row.job_id in self._cancels_seen:
                row.flag = "cancel"
            task = asyncio.create_task(self._run(row), name=f"job-{key}")
            tokens = self.admission.observe(row.body, row.flag != "")
            self.in_flight[key] = InFlight(row, task, time.time(), prompt_tokens=tokens)
            if row.flag != "malformed":
                for listener in self.on_started:
                    listener(row)
        held = self.in_engine
        self.counters.max_in_flight = max(self.counters.max_in_flight, held)
        self.engine.stats.held = held

    # -- one job ------------------------------------------------------------------------------

    async def _run(self, row: Row) -> None:
        key = row.key
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
            if self._solo_key == key:
                self._solo_key = None
            self.streamer.discard(key)
            self.engine.stats.held = self.in_engine
            self._slot_freed.set()

    async def _run_row(self, row: Row, flight: InFlight) -> None:
        s = self.settings
        t0 = row.queued_at
        if row.flag == "malformed":
            self._out_of_engine(flight)
            await self._guard(self.store.dead_letter_entry(row, "malformed entry: no job id"))
            self.counters.dead_lettered += 1
            return
        if row.flag in ("cancel", "expired"):
            self._out_of_engine(flight)
            status = JobStatus.cancelled if row.flag == "cancel" else JobStatus.expired
            msg = "cancelled before it ran" if row.flag == "cancel" else "deadline passed before start"
            await self._publish(row, status, results.failure(
                row, status.value, msg, s.consumer, results.timings(t0, None), status))
            return
        if row.flag == "poisoned" or row.deliveries > s.max_deliveries * HARD_DELIVERY_FACTOR:
            self._out_of_engine(flight)
            await self._publish(row, JobStatus.failed, results.failure(
                row, ErrorCode.poisoned, f"lost {SOLO_LOSS_LIMIT} times while running alone "
                f"(its engine died or hung, or its worker vanished), or delivered more than "
                f"{s.max_deliveries * HARD_DELIVERY_FACTOR} times (this was delivery "
                f"{row.deliveries}); moved to the dead-letter stream", s.consumer,
                results.timings(t0, None)), dead_reason="poisoned")
            self.counters.dead_lettered += 1
            return
        try:
            size = len(row.body.encode("utf-8", "replace"))
            if size > s.max_payload_bytes:
                raise InvalidRequest(f"payload is {size} bytes, over the "
                                     f"{s.max_payload_bytes}-byte limit",
                                     ErrorCode.payload_too_large)
            req = results.parse_request(row)
            if req.deadline is not None and req.deadline <= time.time():
                self._out_of_engine(flight)  # a plain XADD carries its deadline in the body
                await self._publish(row, JobStatus.expired, results.failure(
                    row, "expired", "deadline passed before start", s.consumer,
                    results.timings(t0, None), JobStatus.expired))
                return
            self._arm_deadline(flight, req)
            gen = await self._generate(row, req)
            self._out_of_engine(flight)
        except InvalidRequest as e:
            self._out_of_engine(flight)
            await self._publish(row, JobStatus.failed, results.failure(
                row, e.code, str(e), s.consumer, results.timings(t0, flight.started_at)))
            return
        except _EngineError as e:
            self._out_of_engine(flight)
            await self._publish(row, JobStatus.failed, results.failure(
                row, ErrorCode.engine_error, str(e), s.consumer,
                results.timings(t0, flight.started_at), retryable=True))
            return
        if self.fatal is not None or (gen.aborted and flight.abort_reason is None):
            return  # aborted by our own shutdown: leave the entry for a peer
        status = flight.abort_reason or JobStatus.succeeded
        self.counters.output_tokens += gen.completion_tokens
        await self._publish(row, status, results.from_generation(
            row, gen, status, s.consumer,
            results.timings(t0, flight.started_at, gen.first_token_at)))

    async def _generate(self, row: Row, req: JobRequest) -> Generation:
        """The engine's answer; an unexpected error fails this job alone (retryable) unless
        the engine keeps failing, then it counts as dead."""
        on_delta = None
        if req.stream:
            self.streamer.open(row)
            on_delta = functools.partial(self.streamer.add, row.key)
        try:
            gen = await self.engine.generate(row.job_id, req, on_delta)
        except (InvalidRequest, EngineDead, asyncio.CancelledError):
            raise
        except Exception as e:
            self._engine_errors += 1
            log.exception("engine failed job %s (%d in a row)", row.job_id, self._engine_errors)
            if self._engine_errors >= ENGINE_ERROR_LIMIT:
                raise EngineDead(f"engine failed {self._engine_errors} requests in a row: "
                                 f"{e!r}") from e
            raise _EngineError(f"engine error: {type(e).__name__}: {e}") from None
        self._engine_errors = 0
        return gen

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

    def cancel_requested(self, job_id: str, source: str = "control channel") -> None:
        """A client asked to cancel ``job_id`` (``source``: the control channel, or the flag
        in its record found at lease renewal)."""
        if job_id in self.in_flight:
            log.info("job %s cancel requested (%s)", job_id, source)
            self.abort(job_id, JobStatus.cancelled)
            return
        for row in self._solo_waiting:
            if row.job_id == job_id:  # it never ran: publish the cancellation at once
                self._solo_waiting.remove(row)
                row.flag, row.solo = "cancel", False
                self.launch([row])
                return
        self._cancels_seen[job_id] = time.monotonic()
        while len(self._cancels_seen) > 4096:
            self._cancels_seen.popitem(last=False)

    def lease_report(self, rows: list[Row], codes: list[str]) -> None:
        """Act on what lease renewal found: cancellations missed on the control channel,
        jobs finished elsewhere (stop computing a duplicate), entries taken over by a peer."""
        for row, code in zip(rows, codes, strict=False):
            if code == "cancel":
                self.cancel_requested(row.job_id, "lease renewal")
            elif code == "done":
                if row in self._solo_waiting:
                    self._solo_waiting.remove(row)
                    row.solo = False
                    self.launch([row])  # publishes nothing new; acknowledges the entry
                else:
                    self.abort(row.job_id, JobStatus.cancelled)  # result already exists
            elif code == "lost":
                self.counters.leases_lost += 1
                if row in self._solo_waiting:
                    self._solo_waiting.remove(row)  # a peer runs it now
                log.warning("job %s: lease lost to a peer (this worker was too slow to "
                            "renew); the first result wins", row.job_id)

    # -- results ------------------------------------------------------------------------------

    async def _publish(self, row: Row, status: JobStatus, result_json: str,
                       dead_reason: str = "") -> None:
        await self.streamer.drain(row.key)  # its last delta goes before its ``end`` entry
        delay = 0.05
        while True:
            try:
                published = await self._guard(self.store.finish(
                    row, status.value, result_json, self.settings.result_ttl, dead_reason))
                break
            except REDIS_ERRORS as e:
                if self.fatal is not None:
                    return  # dying: the entry stays pending for a peer
                self.counters.publish_retries += 1
                log.warning("job %s: result not written (%s); retrying in %.2fs",
                            row.job_id, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if published:
            self.counters.count(status.value)
            log.debug("job %s %s", row.job_id, status.value)  # slotfill.jobs logs it
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

    # -- death and drain ----------------------------------------------------------------------

    def die(self, e: BaseException) -> None:
        if self.fatal is not None:
            return
        self.fatal = e
        self.pulling = False
        self._slot_freed.set()
        if not isinstance(e, EngineDead):
            self.dead.set()
            return
        inside = [f.row for f in self.in_flight.values()
                  if not f.publishing and f.row.flag == ""]
        waiting = list(self._solo_waiting)
        task = asyncio.create_task(self._report_crash(inside, waiting))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _report_crash(self, inside: list[Row], waiting: list[Row]) -> None:
        """Mark the jobs that were inside the dead engine and give every held entry back
        for a peer's next sweep. Best effort: without Redis they are reclaimed after the
        lease anyway (unmarked)."""
        lease = self.settings.lease_seconds
        try:
            n = await asyncio.wait_for(self.store.release(
                inside, lease, "engine_crash", alone=len(inside) == 1), CRASH_REPORT_TIMEOUT_S)
            n += await asyncio.wait_for(self.store.release(waiting, lease, "handed_back"),
                                        CRASH_REPORT_TIMEOUT_S)
            self.counters.released += n
            log.error("engine dead: %d jobs were inside%s; given back for reclaim",
                      len(inside), " (alone: charged the loss)" if len(inside) == 1 else "")
        except _REPORT_ERRORS as err:
            log.error("engine dead; could not report the crash to Redis (%s)", err)
        finally:
            self.dead.set()

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for in-flight jobs; abort the rest without publishing and
        give them back (pending, idle past the lease) so a peer's next sweep takes them.
        Returns how many were handed back."""
        self.stop_pulling()
        end = time.monotonic() + grace_s
        while self.in_flight and (left_s := end - time.monotonic()) > 0:
            await asyncio.wait([f.task for f in self.in_flight.values()], timeout=left_s)
        left = list(self.in_flight.values())
        for f in left:
            f.task.cancel()
        await asyncio.gather(*(f.task for f in left), return_exceptions=True)
        rows = [f.row for f in left] + list(self._solo_waiting)
        self._solo_waiting.clear()
        if rows:
            try:
                self.counters.released += await self.store.release(
                    rows, self.settings.lease_seconds, "handed_back")
            except REDIS_ERRORS as e:
                log.warning("could not hand %d jobs back (%s): reclaimed after the lease",
                            len(rows), e)
        return len(rows)


class _EngineError(Exception):
    """The engine raised for one request (not a bad request, not engine death)."""
