"""A worker inside the test process: ``worker.runner.serve`` (what ``slotfill worker`` runs)
on the simulated engine, in a thread with its own event loop.

Starting one takes milliseconds instead of the 2-3 s of a ``python -m slotfill worker``
child, so logic tests (lifecycle, streaming, refill, batch, callbacks, metrics) use it; tests
in which a process must die (SIGKILL, engine crash exit codes) or that test the shell
command itself keep :class:`slotfill.testing.fleet.WorkerProcess`.

Two ways to use it:

- ``run_burst()``: start, process what is queued until the queue is idle, drain, return the
  exit code (arq's "burst" mode);
- ``with InprocWorker(...) as w:``: a worker that runs while the test acts, drained on exit.

SIGTERM/SIGINT reach the worker the way they reach a process: ``serve`` registers its
handlers on its event loop, and this loop keeps them instead of installing them with the
operating system (only the main thread may do that), so :meth:`InprocWorker.signal` runs
exactly the handler the worker registered.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal as _signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import redis

from producer.connection import connect
from producer.keys import QueueKeys
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import unblock_stream_reads
from worker.runner import build_engine, serve
from worker.settings import WorkerSettings

STUCK_AFTER_S = 3.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_log_users = 0
_log_lock = threading.Lock()


class _SignalKeepingLoop(asyncio.SelectorEventLoop):
    """An event loop whose signal handlers are kept here, for :meth:`InprocWorker.signal`."""

    def __init__(self) -> None:
        super().__init__()
        self.kept_handlers: dict[int, tuple[Callable[..., object], tuple[Any, ...]]] = {}

    def add_signal_handler(self, sig: int, callback: Callable[..., object],  # type: ignore[override]
                           *args: Any) -> None:
        self.kept_handlers[sig] = (callback, args)

    def remove_signal_handler(self, sig: int) -> bool:
        return self.kept_handlers.pop(sig, None) is not None


class _Capture(logging.Handler):
    """The worker's log lines (any logger: asyncio's "exception never retrieved" too): those
    of its loop thread and of the worker's own helper threads (named ``slotfill-*``; with
    several in-process workers alive, those are shared)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.thread_id: int | None = None
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id or (record.threadName or "").startswith("slotfill-"):
            self.lines.append(self.format(record))


def _slotfill_logs_on(on: bool) -> None:
    """The worker's INFO lines are what tests read (``configure_logging`` sets INFO in a
    worker process); restore the level when the last in-process worker ends."""
    global _log_users
    with _log_lock:
        _log_users += 1 if on else -1
        if on and _log_users == 1:
            logging.getLogger("slotfill").setLevel(logging.INFO)
        elif not on and _log_users == 0:
            logging.getLogger("slotfill").setLevel(logging.NOTSET)


class InprocWorker:
    """One worker (``engine="sim"`` unless told otherwise) on ``redis_url``; other settings
    as ``WorkerSettings`` fields (``queue=``, ``max_num_seqs=``, ``lease_seconds=``, ...)."""

    def __init__(self, redis_url: str, consumer: str, **settings: Any) -> None:
        fields: dict[str, Any] = {"engine": "sim", **settings}
        self.settings = WorkerSettings(redis_url=redis_url, consumer=consumer, **fields)
        self.redis_url = redis_url
        self.consumer = consumer
        self.queue = self.settings.queue
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._loop: _SignalKeepingLoop | None = None
        self._thread: threading.Thread | None = None
        self._capture = _Capture()
        self._logs_attached = False
        self._root: asyncio.Task[int] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> InprocWorker:
        assert self._thread is None, "an InprocWorker runs once"
        logging.getLogger().addHandler(self._capture)
        _slotfill_logs_on(True)
        self._logs_attached = True
        self._loop = _SignalKeepingLoop()
        self._thread = threading.Thread(target=self._main, name=f"inproc-{self.consumer}",
                                        daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        assert self._loop is not None
        self._capture.thread_id = threading.get_ident()
        asyncio.set_event_loop(self._loop)
        try:
            self.exit_code = self._loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to the test by wait_ready, join and stop
            self.error = e
        finally:
            self._loop.close()

    async def _serve(self) -> int:
        self._root = asyncio.current_task()
        engine = build_engine(self.settings)
        try:
            return await serve(self.settings, engine)
        finally:
            engine.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_running(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError(f"in-process worker {self.consumer} ended (exit code "
                               f"{self.exit_code}, error {self.error!r}):\n{self.tail()}")

    def wait_ready(self, timeout: float = 30.0) -> InprocWorker:
        """Until the worker's heartbeat appears (as ``WorkerProcess.wait_ready``)."""
        r = connect(self.redis_url)
        key = QueueKeys.for_queue(self.queue).worker(self.consumer)

        def ready() -> bool:
            self._check_running()
            return bool(r.exists(key))

        try:
            wait_until(ready, timeout=timeout, what=f"worker {self.consumer}'s heartbeat")
        finally:
            r.close()
        return self

    def signal(self, sig: int) -> None:
        """Run the handler the worker registered for ``sig`` (SIGTERM/SIGINT: drain)."""
        assert self._loop is not None
        wait_until(lambda: sig in self._loop.kept_handlers or not self.alive,  # type: ignore[union-attr]
                   timeout=30, what=f"worker {self.consumer} to install its signal handlers")
        if self.alive:
            callback, args = self._loop.kept_handlers[sig]
            self._loop.call_soon_threadsafe(callback, *args)

    def join(self, timeout: float = 60.0) -> int | None:
        """Until the worker returns; its exit code (``EXIT_*`` of ``worker.runner``)."""
        if self._thread is not None:
            self._thread.join(0.05)
            start = time.monotonic()
            end, recancelled = start + timeout, False
            while self._thread.is_alive() and time.monotonic() < end:
                unblock_stream_reads(self.redis_url)  # its idle read would hold it 2 s
                self._thread.join(0.05)
                if not recancelled and time.monotonic() - start > STUCK_AFTER_S:
                    recancelled = True
                    self._recancel()
            if self._thread.is_alive():
                raise TimeoutError(f"in-process worker {self.consumer} still running after "
                                   f"{timeout}s:\n{self.tail()}\n{self._task_stacks()}")
        self._detach_logs()
        if self.error is not None:
            raise RuntimeError(f"in-process worker {self.consumer} failed") from self.error
        return self.exit_code

    def _recancel(self) -> None:
        """Seen a few times under load: a stopping worker whose upkeep task, cancelled in the
        middle of a Redis call, got a Redis error instead of the cancellation, and the
        runner's retry loop (``_resilient``) went on retrying, so ``serve`` never returned.
        Cancel the stragglers once more (a worker process would wait for its SIGKILL) and
        warn with where they were, so it stays visible."""
        loop, root = self._loop, self._root
        if loop is None:
            return
        warnings.warn(f"in-process worker {self.consumer} still stopping after "
                      f"{STUCK_AFTER_S}s; cancelling its tasks again:\n{self.tail(5)}\n"
                      f"{self._task_stacks()}", RuntimeWarning, stacklevel=3)

        def cancel_all() -> None:
            for task in asyncio.all_tasks(loop):
                if task is not root:
                    task.cancel()

        loop.call_soon_threadsafe(cancel_all)

    def _detach_logs(self) -> None:
        if self._logs_attached:
            self._logs_attached = False
            logging.getLogger().removeHandler(self._capture)
            _slotfill_logs_on(False)

    def _task_stacks(self) -> str:
        """Where the worker's tasks wait (read from another thread: a diagnostic only)."""
        if self._loop is None:
            return ""
        out = io.StringIO()
        for task in list(asyncio.all_tasks(self._loop)):
            out.write(f"task {task.get_name()} ({'cancelling' if task.cancelling() else 'pending'})"
                      ":\n")
            coro: Any = task.get_coro()
            while coro is not None:  # the whole await chain, not only the task's own frame
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                if frame is not None:
                    out.write(f"  {frame.f_code.co_filename}:{frame.f_lineno} "
                              f"{frame.f_code.co_name}\n")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        return out.getvalue()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful drain) and wait; the exit code."""
        if self.alive:
            self.signal(_signal.SIGTERM)
        return self.join(timeout)

    # -- burst mode -------------------------------------------------------------------------

    def queue_size(self, r: redis.Redis) -> int:
        """Entries in the queue's streams: queued, or read and not yet finished."""
        return sum(int(r.xlen(s)) for s in QueueKeys.for_queue(self.queue).streams)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no entry is left in the queue's streams (finished jobs are deleted)."""
        r = connect(self.redis_url)
        def idle() -> bool:
            self._check_running()
            return self.queue_size(r) == 0

        try:
            wait_until(idle, timeout=timeout, what=f"queue {self.queue!r} to be empty")
        finally:
            r.close()

    def run_burst(self, timeout: float = 60.0) -> int | None:
        """Process what is queued, then drain and return the exit code (arq's burst mode)."""
        if self._thread is None:
            self.start()
        self.wait_ready()
        self.wait_idle(timeout)
        return self.stop()

    # -- logs -------------------------------------------------------------------------------

    def log_text(self) -> str:
        return "\n".join(self._capture.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self._capture.lines[-n:])

    def __enter__(self) -> InprocWorker:
        if self._thread is None:
            self.start()
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
