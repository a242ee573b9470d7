"""Completion callbacks into Celery: a job whose request names ``callback`` gets its result
sent, once published, as a Celery task to the backend's broker.

    client.submit(prompt="...", callback={"celery_task": "app.tasks.on_result",
                                          "queue": "llm-results"})

The worker calls ``Celery(broker=...).send_task(name, args=[result_dict], queue=...)`` in a
one-thread executor, so the event loop never waits on a broker. The task id is
``slotfill-<job id>``, which lets the receiving side drop a repeat.

Guarantees: the callback is sent after the result is durable in Redis, at most once per
published result, by the worker that published it. A worker killed between those two steps
loses the callback (the result itself is safe in Redis); a broker that stays unreachable for
``celery_send_timeout`` seconds loses it too (logged, counted as ``error``). Jobs cancelled
while still queued never reach a worker and send no callback.

Brokers: a callback without ``broker_url`` goes to ``SLOTFILL_CELERY_BROKER_URL``; one that
names a broker must name that one or one of ``SLOTFILL_CELERY_BROKERS``; anything else is
refused, so a submitter cannot make workers connect to arbitrary hosts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from producer.schema import CeleryCallback

if TYPE_CHECKING:
    from worker.claim import ClaimedJob
    from worker.settings import WorkerSettings

log = logging.getLogger("slotfill.worker")


class CeleryBridge:
    def __init__(self, settings: WorkerSettings,
                 outcome: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.allowed = {u for u in [settings.celery_broker_url, *settings.celery_brokers] if u}
        self.outcome = outcome or (lambda _o: None)
        self.counts: dict[str, int] = {"sent": 0, "refused": 0, "error": 0}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slotfill-celery")
        self._apps: dict[str, Any] = {}
        self._pending: set[Future[None]] = set()
        self._lock = threading.Lock()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1
        self.outcome(outcome)

    def on_published(self, row: ClaimedJob, status: str, result_json: str) -> None:
        """``Feeder.on_published`` listener: never blocks, never raises."""
        if '"callback"' not in row.body:
            return
        try:
            spec = json.loads(row.body).get("callback")
            if spec is None:
                return
            cb = CeleryCallback.model_validate(spec)
        except (ValueError, AttributeError, ValidationError) as e:
            log.warning("job %s: bad completion callback: %s", row.job_id, e)
            self._count("refused")
            return
        broker = cb.broker_url or self.settings.celery_broker_url
        if not broker or broker not in self.allowed:
            log.warning("job %s: callback %s refused: broker %s", row.job_id, cb.celery_task,
                        "not configured (SLOTFILL_CELERY_BROKER_URL)" if not broker
                        else "not allowed (SLOTFILL_CELERY_BROKERS)")
            self._count("refused")
            return
        fut = self._executor.submit(self._send, broker, cb, row.job_id, result_json)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _app(self, broker: str) -> Any:
        app = self._apps.get(broker)
        if app is None:
            from celery import Celery

            app = Celery("slotfill-callbacks", broker=broker, set_as_current=False)
            app.conf.update(
                task_serializer="json", accept_content=["json"],
                broker_connection_timeout=self.settings.celery_send_timeout,
                broker_connection_retry=True, broker_connection_max_retries=3,
                broker_transport_options={"socket_timeout": self.settings.celery_send_timeout,
                                          "socket_connect_timeout":
                                              self.settings.celery_send_timeout},
            )
            self._apps[broker] = app
        return app

    def _send(self, broker: str, cb: CeleryCallback, job_id: str, result_json: str) -> None:
        try:
            result = json.loads(result_json)
            self._app(broker).send_task(
                cb.celery_task, args=[result], queue=cb.queue, task_id=f"slotfill-{job_id}",
                retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2,
                                          "interval_step": 0.5, "interval_max": 2.0},
            )
        except Exception as e:  # a broker problem must not hurt the worker
            log.error("job %s: callback %s to the Celery broker failed: %s", job_id,
                      cb.celery_task, e, extra={"job_id": job_id})
            self._count("error")
            return
        log.info("job %s: callback %s sent", job_id, cb.celery_task,
                 extra={"job_id": job_id, "event": "callback_sent"})
        self._count("sent")

    def close(self, timeout: float | None = None) -> int:
        """Let queued sends finish (up to ``timeout``, default ``celery_send_timeout``);
        returns how many were still unsent."""
        with self._lock:
            pending = list(self._pending)
        left = 0
        if pending:
            _, not_done = wait_futures(pending, timeout=timeout or self.settings.celery_send_timeout)
            left = len(not_done)
        self._executor.shutdown(wait=left == 0, cancel_futures=True)
        for app in self._apps.values():
            try:
                app.close()
            except Exception:
                pass
        return left
