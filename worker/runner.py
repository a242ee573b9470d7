"""A worker process: one engine, one feeder, its upkeep tasks, signals and exit codes.

Exit codes: 0 after a clean drain, 3 when the engine died or hung (jobs stay un-acked and
are reclaimed by peers), 4 for a settings error, 5 when Redis refuses us for good (wrong
password, missing ACL permission, a malformed URL). A Redis that is down, stalled, failing
over, read-only, short of replicas or out of memory never ends a worker: it waits with
backoff and reconnects (a Sentinel client asks the sentinels for the new master).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from producer.connection import connect_async
from producer.errors import EngineDead
from producer.redis_errors import is_config_error, is_transient
from worker import upkeep
from worker.engines.base import Engine
from worker.feeder import Feeder
from worker.ops import install as install_ops
from worker.settings import WorkerSettings
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

        return SimEngine(settings.max_num_seqs, settings.sim_step_ms, settings.max_model_len,
                         settings.max_num_batched_tokens)
    from worker.engines.vllm import VllmEngine

    model = settings.model
    if not model:
        from worker.engines.tiny_model import make_tiny_model

        model = str(make_tiny_model(default_model_dir()))
        settings.load_format = "dummy"
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
            if asyncio.get_running_loop().time() - started > 10 * BACKOFF_MAX_S:
                delay = BACKOFF_MIN_S  # it had recovered: this is a new outage
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", name, e, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX_S)


async def serve(settings: WorkerSettings, engine: Engine | None = None) -> int:
    """Run until SIGTERM/SIGINT (drain, exit 0) or engine death (exit 3)."""
    engine = engine or build_engine(settings)
    try:
        client = connect_async(settings.redis_url)
    except ValueError as e:
        log.error("redis configuration error: %s", e)
        return EXIT_REDIS_CONFIG
    store = WorkerStore(client, settings.queue, settings.consumer)
    try:
        await _resilient("start", store.ensure_groups)
    except Exception as e:
        if not is_config_error(e):
            raise
        log.error("redis refuses this worker (%s: %s); fix the URL or its ACL",
                  type(e).__name__, e)
        await client.aclose()
        return EXIT_REDIS_CONFIG
    # Opened once at start-up, before any job runs; line-buffered writes are cheap.
    step_log = open(settings.step_log, "a", buffering=1) if settings.step_log else None  # noqa: SIM115, ASYNC230
    engine.stats.log = step_log
    feeder = Feeder(engine, store, settings)
    ops = install_ops(feeder, settings)  # metrics, job log lines, Celery callbacks
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    duties = {
        "pull": feeder.run, "leases": lambda: upkeep.renew_leases(feeder),
        "reclaim": lambda: upkeep.reclaim(feeder), "cancels": lambda: upkeep.listen_for_cancels(feeder),
        "heartbeat": lambda: upkeep.heartbeat(feeder), "watchdog": lambda: upkeep.watchdog(feeder),
        "tokens": feeder.streamer.run,
    }
    tasks = {name: asyncio.create_task(_resilient(name, fn), name=name)
             for name, fn in duties.items()}
    log.info("worker %s pulling queue %r, capacity %d (%d slots + %d headroom)",
             settings.consumer, settings.queue, feeder.capacity, engine.slots, settings.headroom)
    stopper = asyncio.create_task(stop.wait())
    dead = asyncio.create_task(feeder.dead.wait())
    await asyncio.wait({stopper, dead, tasks["pull"]}, return_when=asyncio.FIRST_COMPLETED)
    code = EXIT_OK
    pull = tasks["pull"]
    if pull.done() and not pull.cancelled() and pull.exception() is not None:
        feeder.die(pull.exception() or RuntimeError("pull loop failed"))
    if feeder.fatal is not None and is_config_error(feeder.fatal):
        log.error("redis refuses this worker (%s); fix the URL or its ACL", feeder.fatal)
        code = EXIT_REDIS_CONFIG
    elif feeder.fatal is not None and not isinstance(feeder.fatal, EngineDead):
        log.error("pull loop failed: %r; exiting for the supervisor to restart us",
                  feeder.fatal)
        code = EXIT_ENGINE_DEAD
    elif feeder.fatal is not None:
        # The feeder's crash report has already said which jobs it handed back.
        log.error("engine dead: %s; exiting for the supervisor to restart us", feeder.fatal)
        code = EXIT_ENGINE_DEAD
    else:
        handed_back = await feeder.drain(settings.grace_seconds)
        log.info("drained; %d unfinished jobs handed back for reclaim", handed_back)
    for t in (*tasks.values(), stopper, dead):
        t.cancel()
    await asyncio.gather(*tasks.values(), stopper, dead, return_exceptions=True)
    if code == EXIT_OK:
        try:
            await store.drop_heartbeat()
        except Exception as e:
            if not is_transient(e):
                raise
    await asyncio.to_thread(ops.close)
    await client.aclose()
    if step_log:
        step_log.close()
    return code


def run_worker(settings: WorkerSettings) -> int:
    async def main() -> int:
        engine = build_engine(settings)
        try:
            return await serve(settings, engine)
        finally:
            engine.close()

    return asyncio.run(main())
