"""One held job, top to bottom: triage the claim into an outcome, run it in the engine if it
runs, publish once.

* :func:`triage` decides everything that needs no engine: the claim's disposition (cancelled,
  expired, malformed, poisoned), the payload limit, the body, a deadline in the body.
* :meth:`JobTasks.run` sends a runnable job to the engine; an engine error for this job alone
  fails it (retryable), an engine that keeps failing is dead.
* The outcome is written once, through any Redis outage; a job aborted by this worker's own
  shutdown publishes nothing (its entry stays pending for a peer).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from producer.errors import EngineDead, ErrorCode, InvalidRequest
from producer.schema import JobRequest, JobStatus
from worker import results
from worker.claim import ClaimedJob, Disposition
from worker.engines.base import Engine, Generation
from worker.in_flight import Holdings, InFlight
from worker.results import Outcome
from worker.resume import (
    NO_CHECKPOINT,
    ResumePlan,
    Seam,
    ends_with_stop,
    restart_reason,
    stop_strings,
)
from worker.settings import WorkerSettings
from worker.state import Counters
from worker.store import HARD_DELIVERY_FACTOR, REDIS_ERRORS, SOLO_LOSS_LIMIT, WorkerStore
from worker.token_stream import TokenStreamer

log = logging.getLogger("slotfill.worker")

ENGINE_ERROR_LIMIT = 3
"""Consecutive unexpected engine errors (each fails its own job, retryable) after which the
engine is treated as dead: an engine that fails everything must not eat the queue."""

Published = Callable[[ClaimedJob, str, str], None]
"""Called with (row, status, result JSON) after a result is published (metrics, completion
callbacks, job log lines). Must not block: schedule I/O as a task."""


def triage(row: ClaimedJob, s: WorkerSettings, started_at: float,
           now: float) -> Outcome | JobRequest:
    """The job's outcome when it needs no engine, else its request. ``now``: Redis' clock,
    the one deadlines are on."""
    before_start = results.timings(row.queued_at, None)
    d = row.disposition
    if d is Disposition.malformed:
        return results.no_job("malformed entry: no job id")
    if d is Disposition.cancelled:
        return results.failure(row, "cancelled", "cancelled before it ran", s.consumer,
                               before_start, JobStatus.cancelled)
    if d is Disposition.expired:
        return results.failure(row, "expired", "deadline passed before start", s.consumer,
                               before_start, JobStatus.expired)
    if d is Disposition.poisoned:
        return results.failure(
            row, ErrorCode.poisoned, f"dead-lettered: its engine died or hung "
            f"{SOLO_LOSS_LIMIT} times while it ran alone, or it was delivered more than "
            f"{s.max_deliveries * HARD_DELIVERY_FACTOR} times (this was delivery "
            f"{row.deliveries}); see the dead-letter stream", s.consumer, before_start,
            dead_reason="poisoned")
    try:
        size = len(row.body.encode("utf-8", "replace"))
        if size > s.max_payload_bytes:
            raise InvalidRequest(f"payload is {size} bytes, over the "
                                 f"{s.max_payload_bytes}-byte limit", ErrorCode.payload_too_large)
        req = results.parse_request(row)
    except InvalidRequest as e:
        return results.failure(row, e.code, str(e), s.consumer,
                               results.timings(row.queued_at, started_at))
    if req.deadline is not None and req.deadline <= now:
        # A plain XADD carries its deadline in the body only.
        return results.failure(row, "expired", "deadline passed before start", s.consumer,
                               before_start, JobStatus.expired)
    return req


class JobTasks:
    """Runs each held job as its own task (``run``); aborts running ones (``abort``)."""

    def __init__(self, engine: Engine, store: WorkerStore, settings: WorkerSettings,
                 holdings: Holdings, streamer: TokenStreamer, counters: Counters, *,
                 left_engine: Callable[[], None],
                 on_fatal: Callable[[BaseException], None],
                 dying: Callable[[], bool],
                 freed: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.holdings = holdings
        self.streamer = streamer
        self.counters = counters
        self.left_engine = left_engine
        """Told whenever a job frees its engine place (the pull loop may read more)."""
        self.on_fatal = on_fatal
        self.dying = dying
        self.freed = freed
        """Told once per job, the moment it leaves the engine (refill tracing)."""
        self.on_published: list[Published] = []
        self._engine_errors = 0
        self._background: set[asyncio.Task[Any]] = set()

    async def run(self, row: ClaimedJob) -> None:
        """The task of one held job (the holdings already list it)."""
        flight = self.holdings.jobs[row.key]
        try:
            outcome = await self._outcome(row, flight)
            self._leave_engine(flight)
            if outcome is not None:
                await self._publish(row, outcome)
        except EngineDead as e:
            self.on_fatal(e)
        except Exception as e:  # a bug in our code: fail loudly, keep the job for a retry
            log.exception("job %s crashed its job task", row.job_id)
            self.on_fatal(e)
        finally:
            self.holdings.remove(row.key)
            self.streamer.discard(row.key)
            self.left_engine()

    def _leave_engine(self, flight: InFlight) -> None:
        if self.holdings.out_of_engine(flight):
            self.freed()
            self.left_engine()

    async def _outcome(self, row: ClaimedJob, flight: InFlight) -> Outcome | None:
        """How the job ends; None when this worker's own shutdown aborted it."""
        req = triage(row, self.settings, flight.started_at, self.store.now())
        if isinstance(req, Outcome):
            return req
        s, t0 = self.settings, row.queued_at
        self._arm_deadline(flight, req)
        plan, restarted = await self._plan(row, req)
        try:
            gen = await self._generate(row, req, plan)
        except InvalidRequest as e:
            return results.failure(row, e.code, str(e), s.consumer,
                                   results.timings(t0, flight.started_at))
        except _EngineError as e:
            return results.failure(row, ErrorCode.engine_error, str(e), s.consumer,
                                   results.timings(t0, flight.started_at), retryable=True)
        if self.dying() or flight.lost or (gen.aborted and flight.abort_reason is None):
            # Aborted by our own shutdown (the entry stays for a peer), or a peer owns the job
            # now: only the current attempt publishes, the one its token stream shows.
            return None
        self.counters.output_tokens += gen.completion_tokens - (plan.at if plan else 0)
        return results.from_generation(
            row, gen, flight.abort_reason or JobStatus.succeeded, s.consumer,
            results.timings(t0, flight.started_at, gen.first_token_at),
            plan.at if plan else None, restarted)

    async def _plan(self, row: ClaimedJob, req: JobRequest) -> tuple[ResumePlan | None,
                                                                     str | None]:
        """Where a reclaimed job's attempt starts: its checkpoint (a plan), or from scratch
        (and why)."""
        if row.attempts <= 1:
            return None, None
        why = restart_reason(req)
        if why is not None:
            return None, why
        ids: list[int] = []
        if self.streamer.checkpoints:
            try:
                ids = await self.store.load_checkpoint(row)
            except REDIS_ERRORS as e:  # starting over is always sound
                log.warning("job %s: checkpoint not read (%s); starting over", row.job_id, e)
        if not ids:
            return None, NO_CHECKPOINT
        ids = ids[:req.max_tokens]
        log.info("job %s resumes at token %d (attempt %d)", row.job_id, len(ids), row.attempts)
        stopped = ends_with_stop(req, ids, self.engine.eos_token_ids)
        text = self.engine.detokenize(ids[:-1] if stopped else ids)
        return ResumePlan(req, ids, text, stopped), None

    async def _generate(self, row: ClaimedJob, req: JobRequest,
                        plan: ResumePlan | None = None) -> Generation:
        """The engine's answer; an unexpected error fails this job alone (retryable) unless
        the engine keeps failing, then it counts as dead."""
        on_delta = None
        if self.streamer.open(row, req.stream, plan.at if plan else None):
            on_delta = functools.partial(self.streamer.add, row.key)
        try:
            if plan is None:
                gen = await self.engine.generate(row.job_id, req, on_delta)
            else:
                gen = await self._continue(row, plan, on_delta)
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

    async def _continue(self, row: ClaimedJob, plan: ResumePlan,
                        on_delta: Any) -> Generation:
        """Generate the rest of a job after its carried tokens, and merge the two."""
        req = plan.request
        over = plan.over()
        if over is not None:
            # The earlier attempt's generation had ended (all its tokens, EOS, a stop token
            # or string) and it died before publishing: finish with what it left.
            reason, cut = over
            done = Generation("", [], reason, await self.engine.prompt_tokens(req), 0)
            return plan.merge(done, None, cut)
        seam = Seam(plan.text, stop_strings(req), on_delta,
                    lambda: self.background(self.engine.abort(row.job_id)))
        gen = await self.engine.generate(row.job_id, plan.narrowed(), seam.feed, plan.ids)
        seam.close()
        return plan.merge(gen, seam)

    def _arm_deadline(self, flight: InFlight, req: JobRequest) -> None:
        if req.deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, req.deadline - self.store.now())
        flight.deadline_handle = loop.call_later(delay, self.abort, flight.row.key,
                                                 JobStatus.expired)

    def abort(self, key: str, reason: JobStatus) -> None:
        """Abort a running job in the engine; its result gets status ``reason``."""
        flight = self.holdings.get(key)
        if flight is None or flight.abort_reason is not None:
            return
        flight.abort_reason = reason
        self.background(self.engine.abort(flight.row.job_id))

    def lose(self, key: str) -> None:
        """A peer took the job over (our lease lapsed): stop it here and publish nothing."""
        flight = self.holdings.get(key)
        if flight is None or flight.lost:
            return
        flight.lost = True
        self.streamer.discard(key)
        if not flight.publishing and flight.abort_reason is None:
            flight.abort_reason = JobStatus.cancelled
            self.background(self.engine.abort(flight.row.job_id))

    def background(self, coro: Any) -> None:
        """Run ``coro`` as a task kept alive until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- publishing ---------------------------------------------------------------------------

    async def _publish(self, row: ClaimedJob, outcome: Outcome) -> None:
        if outcome.status is not None:
            await self.streamer.drain(row.key)  # its last delta goes before its ``end`` entry
        published = await self._write(row, outcome)
        if published is None:
            return  # dying: the entry stays pending for a peer
        if outcome.dead_reason and published:
            self.counters.dead_lettered += 1
        if outcome.status is None:
            return
        if published:
            self.counters.count(outcome.status.value)
            log.debug("job %s %s", row.job_id, outcome.status.value)  # slotfill.jobs logs it
            for listener in self.on_published:
                listener(row, outcome.status.value, outcome.result_json)
        else:
            self.counters.duplicates += 1
            log.info("job %s: duplicate result suppressed", row.job_id)

    async def _write(self, row: ClaimedJob, outcome: Outcome) -> bool | None:
        """One atomic write of the outcome, retried while Redis is unavailable. False: the job
        already had a result (a duplicate run); None: gave up because the worker is dying."""
        delay = 0.05
        while True:
            try:
                if outcome.status is None:
                    await _guard(self.store.dead_letter_entry(row, outcome.dead_reason))
                    return True
                return await _guard(self.store.finish(
                    row, outcome.status.value, outcome.result_json, self.settings.result_ttl,
                    outcome.dead_reason, results.callback_of(row),
                    self.settings.celery_redeliver_seconds))
            except REDIS_ERRORS as e:
                if self.dying():
                    return None
                self.counters.publish_retries += 1
                log.warning("job %s: result not written (%s); retrying in %.2fs",
                            row.job_id, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def _guard(coro: Any) -> bool:
    # The finishing write must complete even if our task is cancelled mid-way (shutdown):
    # a half-seen reply would leave us unsure whether the job is done.
    return bool(await asyncio.shield(coro))


class _EngineError(Exception):
    """The engine raised for one request (not a bad request, not engine death)."""
