"""A worker process: one engine, one feeder, its upkeep tasks, signals and exit codes.

Exit codes: 0 after a clean drain, 3 when the engine died or hung (jobs stay un-acked and
are reclaimed by peers), 4 for a settings error, 5 when Redis refuses us for good (wrong
password, missing ACL permission, a malformed URL). A Redis that is down, stalled, failing
over, read-only, short of replicas or out of memory never ends a worker: it waits with
backoff and reconnects (a Sentinel client asks the sentinels for the new master).
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from producer.connection import connect_async
from producer.errors import EngineDead
from producer.redis_errors import is_config_error, is_transient
from worker import upkeep
from worker.cancelling import CLEANUP_S, cancel_and_wait
from worker.engines.base import Engine
from worker.feeder import Feeder
from worker.ops import install as install_ops
from worker.refill_trace import RefillTrace, read_log_path
from worker.settings import TINY_ENGINE, WorkerSettings, apply_engine_defaults
from worker.step_log import StepLog
from worker.store import WorkerStore

log = logging.getLogger("slotfill.worker")

EXIT_OK, EXIT_ENGINE_DEAD, EXIT_SETTINGS, EXIT_REDIS_CONFIG = 0, 3, 4, 5
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0


def default_model_dir() -> Path:
    return Path.home() / ".cache" / "slotfill" / "tiny-model"


def build_engine(settings: WorkerSettings) -> Engine:
    """Create the engine the settings name. An empty model means the generated tiny model."""
    if settings.engine == "sim":
        from worker.engines.sim import SimEngine

        apply_engine_defaults(settings, TINY_ENGINE)
        return SimEngine(settings.max_num_seqs, settings.sim_step_ms, settings.max_model_len,
                         settings.max_num_batched_tokens, settings.sim_output_us)
    from worker.engines.vllm import VllmEngine

    model = settings.model
    if not model:
        from worker.engines.tiny_model import make_tiny_model

        model = str(make_tiny_model(default_model_dir()))
        settings.load_format = "dummy"
        apply_engine_defaults(settings, TINY_ENGINE)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return VllmEngine(settings, model)


async def _resilient(name: str, loop_fn: Callable[[], Awaitable[None]]) -> None:
    """Run a loop forever; a Redis outage (restart, failover, OOM) pauses it with backoff
    instead of killing the worker."""
    delay = BACKOFF_MIN_S
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await loop_fn()
            return
        except Exception as e:
            if not is_transient(e):
                raise
            if _being_cancelled():
                # redis-py can turn a cancellation that lands mid-command into a connection
                # error; retrying it would keep a stopping worker alive forever.
                raise asyncio.CancelledError from e
            if asyncio.get_running_loop().time() - started > 10 * BACKOFF_MAX_S:
                delay = BACKOFF_MIN_S  # it had recovered: this is a new outage
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", name, e, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX_S)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return bool(cancelling()) if cancelling is not None else False


def _duties(feeder: Feeder, store: WorkerStore, settings: WorkerSettings
            ) -> dict[str, Callable[[], Awaitable[None]]]:
    """The worker's long-running tasks, each given what it reads and whom it tells."""
    lease = settings.lease_seconds
    view = upkeep.WorkerView(feeder.engine.stats, feeder.state, feeder.counters,
                             feeder.holdings, feeder.capacity, feeder.engine.slots,
                             feeder.engine.max_model_len)
    return {
        "pull": feeder.run,
        "leases": lambda: upkeep.renew_leases(store, feeder.holdings, feeder.lease_report, lease),
        "reclaim": lambda: upkeep.reclaim(feeder.request_reclaim, lease),
        "cancels": lambda: upkeep.listen_for_cancels_on(
            store.redis, lambda: [k.control for k in store.shards.order],
            feeder.cancel_requested),
        "heartbeat": lambda: upkeep.heartbeat(store, settings, view),
        "watchdog": lambda: upkeep.watchdog(feeder.engine.stats, feeder.state, feeder.holdings,
                                            feeder.die, settings.engine_hang_seconds),
        "tokens": feeder.streamer.run,
    }


async def _open_store(settings: WorkerSettings) -> WorkerStore | None:
    """Connect, make the queue's groups and read Redis' clock, waiting out any outage. None
    when Redis refuses this worker for good (already logged)."""
    try:
        client = connect_async(settings.redis_url)
    except ValueError as e:
        log.error("redis configuration error: %s", e)
        return None
    store = WorkerStore(client, settings.queue, settings.consumer)

    async def start() -> None:
        await store.load_layout()
        await store.ensure_groups()
        await store.seed_config(settings.max_pending)
        await store.sync_clock()

    try:
        await _resilient("start", start)
    except Exception as e:
        if not is_config_error(e):
            raise
        log.error("redis refuses this worker (%s: %s); fix the URL or its ACL",
                  type(e).__name__, e)
        await client.aclose()
        return None
    return store


def _failure_code(fatal: BaseException) -> int:
    """Exit code for a pull loop that ended with something other than engine death."""
    if is_config_error(fatal):
        log.error("redis refuses this worker (%s); fix the URL or its ACL", fatal)
        return EXIT_REDIS_CONFIG
    log.error("pull loop failed: %r; exiting for the supervisor to restart us", fatal)
    return EXIT_ENGINE_DEAD


def _step_log(settings: WorkerSettings, feeder: Feeder, engine: Engine) -> StepLog | None:
    """The step log and, beside it, the refill trace's read log (``step_log`` set)."""
    if not settings.step_log:
        return None
    step_log = StepLog(settings.step_log, feeder.state, lambda: feeder.in_engine)
    engine.stats.subscribe(step_log)
    feeder.trace = RefillTrace(read_log_path(settings.step_log))
    feeder.trace.start()
    return step_log


async def serve(settings: WorkerSettings, engine: Engine | None = None, *,
                owns_process: bool = False) -> int:
    """Run until SIGTERM/SIGINT (drain, exit 0) or engine death (exit 3). ``owns_process``:
    this worker is the whole process (``slotfill worker``), so once it decides to exit it may
    end the process by force (:func:`_exit_backstop`); a worker embedded in another program
    (the in-process test kit) leaves the process alone."""
    engine = engine or build_engine(settings)
    store = await _open_store(settings)
    if store is None:
        return EXIT_REDIS_CONFIG
    client = store.redis
    feeder = Feeder(engine, store, settings)
    step_log = _step_log(settings, feeder, engine)
    ops = install_ops(feeder, settings)  # metrics, job log lines, Celery callbacks
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = {name: asyncio.create_task(_resilient(name, fn), name=name)
             for name, fn in _duties(feeder, store, settings).items()}
    log.info("worker %s pulling queue %r, capacity %d (%d slots + %d headroom)",
             settings.consumer, settings.queue, feeder.capacity, engine.slots, settings.headroom)
    stopper = asyncio.create_task(stop.wait())
    dead = asyncio.create_task(feeder.dead.wait())
    await asyncio.wait({stopper, dead, tasks["pull"]}, return_when=asyncio.FIRST_COMPLETED)
    code = EXIT_OK
    pull = tasks["pull"]
    if pull.done() and not pull.cancelled() and pull.exception() is not None:
        feeder.die(pull.exception() or RuntimeError("pull loop failed"))
    if feeder.fatal is not None and not isinstance(feeder.fatal, EngineDead):
        code = _failure_code(feeder.fatal)
    elif feeder.fatal is not None:
        # The feeder's crash report has already said which jobs it handed back.
        log.error("engine dead: %s; exiting for the supervisor to restart us", feeder.fatal)
        code = EXIT_ENGINE_DEAD
        if owns_process:
            _exit_backstop(loop, code, EXIT_SLACK_S)
    else:
        if owns_process:
            _exit_backstop(loop, code, settings.grace_seconds + EXIT_SLACK_S)
        log.info("stopping: draining for up to %.0fs (a second SIGTERM ends the process now)",
                 settings.grace_seconds)
        handed_back = await feeder.drain(settings.grace_seconds)
        log.info("drained; %d unfinished jobs handed back for reclaim", handed_back)
    await cancel_and_wait((*tasks.values(), stopper, dead), CLEANUP_S)
    if code == EXIT_OK:
        try:
            await store.drop_heartbeat()
        except Exception as e:
            if not is_transient(e):
                raise
    await asyncio.to_thread(ops.close)
    await client.aclose()
    if step_log is not None:
        step_log.close()
        if feeder.trace is not None:
            feeder.trace.close()
    return code


EXIT_SLACK_S = 30.0
"""Longest a worker that decided to exit may take beyond its drain (closing the engine,
ending threads) before the process ends regardless."""


def _exit_backstop(loop: asyncio.AbstractEventLoop, code: int, after_s: float) -> None:
    """The worker has decided to exit: make sure it does. From now on SIGTERM and SIGINT end
    the process at once (the default action), and past ``after_s`` it ends with ``code``
    whatever hangs on the way out (an engine that will not close, a thread that will not
    end). Nothing is lost either way: whatever it held stays pending for its peers."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_DFL)
    timer = threading.Timer(after_s, _hard_exit, (code, after_s))
    timer.daemon = True
    timer.start()


def _hard_exit(code: int, after_s: float) -> None:
    log.error("still not exited %.0fs after deciding to; ending the process", after_s)
    logging.shutdown()
    os._exit(code)


def run_worker(settings: WorkerSettings) -> int:
    """The ``slotfill worker`` process: the engine, then :func:`serve` until it stops.
    ``kill -USR1 <pid>`` writes every thread's Python stack to stderr, even while the event
    loop is stuck (a frozen worker does not answer SIGTERM: its handler needs the loop)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    async def main() -> int:
        engine = build_engine(settings)
        # Everything loaded so far (vLLM, torch, the model's Python objects) lives as long as
        # the process: out of the collector's full passes, which otherwise walk it all while
        # the pull loop waits (refill latency).
        gc.collect()
        gc.freeze()
        try:
            return await serve(settings, engine, owns_process=True)
        finally:
            engine.close()

    return asyncio.run(main())
