"""Keep the engine full: the pull loop. It reads jobs the moment capacity frees and hands each
to its job task (worker/job_task.py), which runs it and publishes its result.

How many jobs each read takes is worker/admission.py's rule (the engine's free slots plus a
small ready queue, counted in jobs and in prompt tokens, held back when its KV cache runs
full). The loop is event-driven: a job leaving the engine, or an engine step that lets
admission take more, sets ``_slot_freed``; it then reads at once, and only blocks (on Redis,
not a timer) when the queue is empty. A job that leaves the engine while a read is on its
way starts one overtaking read for what that read did not ask for (else its replacement
waited for that reply and then a read of its own); reads on their way count as asked for.

Reliability duties that live here, beside the hot path:

* Reclaim: every sweep period (``upkeep.reclaim`` calls ``request_reclaim``) the loop first
  takes over entries idle past the lease, before it reads new ones, so a dead peer's jobs are
  picked up even while this worker is saturated.
* Culprit isolation: a reclaimed job to ``run_alone`` (see producer/lua/includes/poison.lua)
  runs alone: the loop stops taking work, lets the engine empty, marks the run in Redis, runs
  that job by itself, then resumes.
* Engine death: nothing more is pulled or acknowledged; the jobs that were inside the engine
  are reported (``release_jobs`` with ``engine_crash``: the evidence the poison rule counts)
  and given back for a peer's next reclaim sweep; then ``dead`` is set and the worker exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from producer.errors import EngineDead
from producer.schema import JobStatus
from worker.admission import Admission
from worker.cancelling import CLEANUP_S, cancel_and_wait
from worker.claim import ClaimedJob, Disposition
from worker.crash_report import report_crash
from worker.engines.base import Engine, Step
from worker.in_flight import Holdings, InFlight
from worker.job_task import JobTasks, Published
from worker.refill_trace import RefillTrace
from worker.settings import WorkerSettings
from worker.state import Counters, FeederState
from worker.store import REDIS_ERRORS, WorkerStore
from worker.token_stream import TokenStreamer

log = logging.getLogger("slotfill.worker")

IDLE_BLOCK_S = 2.0
"""Longest blocking read while the queue is empty (wakes earlier on any new entry)."""
_REPORT_ERRORS: tuple[type[Exception], ...] = (asyncio.TimeoutError, *REDIS_ERRORS)
FORGET_CONSUMERS_AFTER_S = 3600.0
"""Consumers (dead workers) silent this long with nothing pending leave the group."""
CANCELS_REMEMBERED = 4096


class Feeder:
    def __init__(self, engine: Engine, store: WorkerStore, settings: WorkerSettings) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.holdings = Holdings()
        self.counters = Counters()
        self.state = FeederState()
        self.admission = Admission(settings, engine.stats, engine.slots,
                                   finished=lambda: self.counters.finished,
                                   starved=lambda: self.state.starved_steps)
        self.capacity = self.admission.capacity
        self.streamer = TokenStreamer(store, settings.stream_interval_ms,
                                      settings.stream_max_entries, settings.result_ttl,
                                      settings.checkpoint_interval_ms)
        """Writes jobs' output and checkpoints; its ``run`` is one of the worker's tasks."""
        self.tasks = JobTasks(engine, store, settings, self.holdings, self.streamer,
                              self.counters, left_engine=self._wake, on_fatal=self.die,
                              dying=lambda: self.fatal is not None, freed=self._freed)
        self.on_published: list[Published] = self.tasks.on_published
        self.on_started: list[Callable[[ClaimedJob], None]] = []
        """Called with each job this worker starts (pulled or reclaimed; not malformed
        entries). Must not block."""
        self.fatal: BaseException | None = None
        self.dead = asyncio.Event()
        self.reclaim_due = False
        self.lost_claims = store.lost_claims
        self._parked = False
        """The pull loop waits because admission said to read nothing."""
        self._slot_freed = asyncio.Event()
        self._asked = 0
        """Jobs asked for by reads still on their way (not yet held)."""
        self._overtake: asyncio.Task[None] | None = None
        self._freed_at: float | None = None
        """When the first job since the last read left the engine (the wake delay)."""
        self.trace: RefillTrace | None = None
        """Where each refill's time goes (the bench's breakdown; the runner sets it)."""
        self._cancels_seen: OrderedDict[str, str] = OrderedDict()
        """Cancellations heard for jobs not (yet) in flight, by job id: where each was heard
        (a cancel can overtake the reply that hands us its job)."""
        engine.stats.subscribe(self.state.on_step)
        engine.stats.subscribe(self._on_step)

    def free(self) -> int:
        """Jobs to read now (worker/admission.py), from the estimates as last updated. A job
        whose generation ended frees its place at once, before its result is written:
        measured here, a publish round trip occasionally took ~100 ms under load and held
        slots idle meanwhile."""
        h = self.holdings
        want = self.admission.want(h.in_engine, h.publishing, h.newest_first_prompt_tokens())
        return want - self._asked

    @property
    def in_engine(self) -> int:
        return self.holdings.in_engine

    # -- pull loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Pull until ``stop_pulling`` or engine death."""
        while self.state.pulling and self.fatal is None:
            self.admission.update()
            h = self.holdings
            if h.solo_waiting or h.solo_key is not None:
                if h.solo_key is None and h.in_engine == 0:
                    await self._launch_solo()
                await self._wait_slot()
            elif self.free() <= 0:
                self._parked = True
                await self._wait_slot()
                self._parked = False
            elif not (self.reclaim_due and await self._reclaim()) and not (
                    self.lost_claims.ready(time.monotonic()) and await self._reclaim(True)):
                await self._read()
        if self.fatal is not None:
            await self.dead.wait()  # the crash report is written before the worker exits

    async def _reclaim(self, own: bool = False) -> bool:
        """One reclaim sweep; True when it took something over. Our own entries are renewed
        first, in the same turn of the loop: however long this worker (or Redis) stalled,
        the sweep never finds a job that runs here idle and takes it from itself. ``own``:
        the sweep for our claims whose reply was lost (``LostClaims``)."""
        if own and self._overtake is not None and not self._overtake.done():
            return False  # a read's claims are on their way: never taken twice
        if not own:
            self.reclaim_due = False
        started = time.monotonic()
        self.state.reading = True
        try:
            held = self.holdings.rows()
            if held:
                self.lease_report(held, await self.store.renew_leases(held))
            rows = await self.store.reclaim_jobs(
                self.free(), self.lost_claims.idle_s if own else self.settings.lease_seconds,
                self.settings.max_deliveries, solo_allowed=True,
                forget_after_s=0.0 if own else FORGET_CONSUMERS_AFTER_S, own=own)
        finally:
            self.state.reading = False
        if own:
            self.lost_claims.swept(started, time.monotonic(), len(rows))
        if rows:
            self._take_reclaimed(rows, own)
        return bool(rows)

    async def _read(self) -> None:
        want = self.free()
        self.state.reading = True
        try:
            rows = await self._start(want)
        finally:
            self.state.reading = False
        self.state.backlog = len(rows) >= want
        if rows:
            self.launch(rows)
        else:
            await self._wait_for_work()

    async def _start(self, want: int) -> list[ClaimedJob]:
        """One ``start_jobs`` read, timed for admission (round trip; delay since the first
        job it replaces left the engine) and the refill trace."""
        issued = self.trace.issued() if self.trace is not None else None
        held = self.holdings.in_engine
        t_read = time.monotonic()
        if self._freed_at is not None:
            self.admission.wake_took(t_read - self._freed_at)
            self._freed_at = None
        self._asked += want
        try:
            rows = await self.store.start_jobs(want)
        finally:
            self._asked -= want
        self.admission.read_took(time.monotonic() - t_read)
        if self.trace is not None and issued is not None:
            s = self.engine.stats
            self.trace.read(issued, want, len(rows), held, s.running, s.waiting)
        return rows

    async def _overtaking_read(self) -> None:
        """Jobs left the engine while the pull loop's read was on its way: read their
        replacements now, not after that reply (such a refill took two round trips)."""
        await asyncio.sleep(0)  # the other jobs that finished in this engine step leave too
        h = self.holdings
        if (not self.state.reading or not self._asked or not self.state.pulling
                or self.fatal is not None or h.solo_waiting or h.solo_key is not None):
            return
        want = self.free()
        if want <= 0:
            return
        try:
            rows = await self._start(want)
        except REDIS_ERRORS:
            return  # the pull loop's own read meets the outage and backs off
        if rows:
            self.launch(rows)

    def _on_step(self, step: Step) -> None:
        if self._parked:
            self.admission.update()
            if self.free() > 0:
                self._slot_freed.set()

    def _wake(self) -> None:
        self._slot_freed.set()

    def _freed(self) -> None:
        if self._freed_at is None:
            self._freed_at = time.monotonic()
        if self.state.reading and self._asked and (self._overtake is None
                                                   or self._overtake.done()):
            self._overtake = asyncio.create_task(self._overtaking_read(), name="overtake")
        if self.trace is not None:
            self.trace.freed()

    async def _wait_slot(self) -> None:
        self._slot_freed.clear()
        await self._slot_freed.wait()

    async def _wait_for_work(self) -> None:
        waiter = asyncio.ensure_future(self.store.wait_for_work(IDLE_BLOCK_S))
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({waiter, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait((waiter, freed))
        self._slot_freed.clear()

    def request_reclaim(self) -> None:
        """A reclaim sweep is due: the pull loop does it before its next read."""
        self.reclaim_due = True
        self._slot_freed.set()

    def stop_pulling(self) -> None:
        self.state.pulling = False
        self._slot_freed.set()

    def _take_reclaimed(self, rows: list[ClaimedJob], own: bool = False) -> None:
        if own:
            self.counters.adopted += len(rows)
        else:
            self.counters.reclaimed += len(rows)
        fresh = []
        for r in rows:
            alone = r.disposition is Disposition.run_alone
            log.info("job %s %s (delivery %d%s)", r.job_id,
                     "taken back: its claim's reply was lost" if own else "reclaimed",
                     r.deliveries, ", runs alone" if alone else "")
            if self.holdings.holds(r.key):
                continue  # our own entry (our renewal was late): it already runs here
            if alone:
                self.holdings.solo_waiting.append(r)
            else:
                fresh.append(r)
        if fresh:
            self.launch(fresh)

    async def _launch_solo(self) -> None:
        h = self.holdings
        row = h.solo_waiting[0]
        await self.store.mark_solo_run(row)
        if not h.solo_waiting or h.solo_waiting[0] is not row or h.in_engine:
            return  # a cancel or a lost lease took it meanwhile; or the engine got busy
        h.solo_waiting.popleft()
        self.counters.solo_runs += 1
        log.info("job %s runs alone in the engine (delivery %d)", row.job_id, row.deliveries)
        h.solo_key = row.key
        self.launch([row])

    def launch(self, rows: list[ClaimedJob]) -> None:
        """Hand each claimed job to its own job task."""
        h = self.holdings
        if h.in_engine == 0:
            self.state.busy_since = time.monotonic()
        for row in rows:
            if row.key in h:
                continue  # our own lease renewal raced a reclaim: it already runs here
            if row.disposition.runs and row.job_id in self._cancels_seen:
                log.info("job %s cancel requested (%s) before its claim arrived", row.job_id,
                         self._cancels_seen[row.job_id])
                row = row.becomes(Disposition.cancelled)
            tokens = self.admission.observe(row.body, not row.disposition.runs)
            task = asyncio.create_task(self.tasks.run(row), name=f"job-{row.key}")
            h.add(InFlight(row, task, time.time(), prompt_tokens=tokens))
            if row.disposition is not Disposition.malformed:
                for listener in self.on_started:
                    listener(row)
        self.counters.max_in_flight = max(self.counters.max_in_flight, h.in_engine)

    # -- what upkeep found --------------------------------------------------------------------

    def abort(self, job_id: str, reason: JobStatus) -> None:
        """Abort a running job in the engine; its result gets status ``reason``."""
        self.tasks.abort(job_id, reason)

    def cancel_requested(self, job_id: str, source: str = "control channel") -> None:
        """A client asked to cancel ``job_id`` (``source``: the control channel, or the flag
        in its record found at lease renewal)."""
        if job_id in self.holdings:
            log.info("job %s cancel requested (%s)", job_id, source)
            self.abort(job_id, JobStatus.cancelled)
            return
        waiting = self.holdings.take_waiting(job_id)
        if waiting is not None:  # it never ran: publish the cancellation at once
            log.info("job %s cancel requested (%s) while it waited", job_id, source)
            self.launch([waiting.becomes(Disposition.cancelled)])
            return
        # Every worker on the channel hears every cancel; only the one that claims it acts.
        self._cancels_seen[job_id] = source
        while len(self._cancels_seen) > CANCELS_REMEMBERED:
            self._cancels_seen.popitem(last=False)

    def lease_report(self, rows: list[ClaimedJob], codes: list[str]) -> None:
        """Act on what lease renewal found: cancellations missed on the control channel,
        jobs finished elsewhere (stop computing a duplicate), entries taken over by a peer."""
        for row, code in zip(rows, codes, strict=False):
            if code == "cancel":
                self.cancel_requested(row.job_id, "lease renewal")
            elif code == "done":
                waiting = self.holdings.take_waiting(row.key)
                if waiting is not None:
                    # Never runs: its write finds the result and only acknowledges the entry.
                    self.launch([waiting.becomes(Disposition.cancelled)])
                else:
                    self.abort(row.job_id, JobStatus.cancelled)  # result already exists
            elif code == "lost":
                flight = self.holdings.get(row.key)
                if flight is not None and flight.lost:
                    continue  # already stopped here, still on its way out
                self.counters.leases_lost += 1
                self.holdings.take_waiting(row.key)  # a peer runs it now
                self.tasks.lose(row.key)
                log.warning("job %s: lease lost to a peer (this worker was too slow to "
                            "renew); stopped here, the peer's attempt publishes", row.job_id)

    # -- death and drain ----------------------------------------------------------------------

    def die(self, e: BaseException) -> None:
        if self.fatal is not None:
            return
        self.fatal = e
        self.state.pulling = False
        self._slot_freed.set()
        if not isinstance(e, EngineDead):
            self.dead.set()
            return
        inside = self.holdings.inside_engine()
        waiting = list(self.holdings.solo_waiting)
        self.tasks.background(self._report_crash(inside, waiting))

    async def _report_crash(self, inside: list[ClaimedJob], waiting: list[ClaimedJob]) -> None:
        """Best effort (worker/crash_report.py), then ``dead``."""
        try:
            self.counters.released += await report_crash(
                self.store, self.settings.lease_seconds, inside, waiting)
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
        h = self.holdings
        end = time.monotonic() + grace_s
        if self._overtake is not None:  # its jobs are held (and drained) once it returns
            await asyncio.wait([self._overtake], timeout=grace_s)
        while h.jobs and (left_s := end - time.monotonic()) > 0:
            await asyncio.wait([f.task for f in h.jobs.values()], timeout=left_s)
        left = list(h.jobs.values())
        await cancel_and_wait([f.task for f in left], CLEANUP_S)
        rows = [f.row for f in left] + list(h.solo_waiting)
        h.solo_waiting.clear()
        if rows:
            try:
                self.counters.released += await self.store.release(
                    rows, self.settings.lease_seconds, "handed_back")
            except REDIS_ERRORS as e:
                log.warning("could not hand %d jobs back (%s): reclaimed after the lease",
                            len(rows), e)
        return len(rows)
