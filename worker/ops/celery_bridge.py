"""Completion callbacks into Celery: a job whose request names ``callback`` gets its result
sent, once published, as a Celery task to the backend's broker.

    client.submit(prompt="...", callback={"celery_task": "app.tasks.on_result",
                                          "queue": "llm-results"})

The worker calls ``Celery(broker=...).send_task(name, args=[result_dict], queue=...)`` in a
one-thread executor, so the event loop never waits on a broker. The task id is
``slotfill-<job id>``, which lets the receiving side drop a repeat.

Guarantees: at least once per published result. ``finish_job`` puts the job in the queue's
callback outbox (``slotfill:{Q}:callbacks``, with the spec in the job record) in the same step
as the result; the publishing worker sends it and then removes it. One that was never
confirmed — its worker died between the two, or the broker was unreachable — is claimed by
any worker's sweeper ``celery_redeliver_seconds`` later and sent again (again and again while
the broker stays down, until the result expires). A repeat is possible only when a sender
dies (or stalls past that time) between sending and confirming; it carries the same task id.
Jobs cancelled while still queued never reach a worker and send no callback.

Brokers: a callback without ``broker_url`` goes to ``SLOTFILL_CELERY_BROKER_URL``; one that
names a broker must name that one or one of ``SLOTFILL_CELERY_BROKERS``; anything else is
refused, so a submitter cannot make workers connect to arbitrary hosts.
"""

from __future__ import annotations

import json
import logging
import threading
import time
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


SWEEP_BATCH = 50


class CeleryBridge:
    def __init__(self, settings: WorkerSettings,
                 outcome: Callable[[str], None] | None = None) -> None:
        from producer.connection import connect
        from producer.keys import QueueKeys
        from producer.scripts import source

        self.settings = settings
        self.keys = QueueKeys.for_queue(settings.queue)
        self._redis = connect(settings.redis_url, socket_timeout=5.0,
                              socket_connect_timeout=5.0)
        self._claim = self._redis.register_script(source("claim_callbacks"))
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="slotfill-callback-sweeper",
                                         daemon=True)
        self._sweeper.start()
        self.allowed = {u for u in [settings.celery_broker_url, *settings.celery_brokers] if u}
        self.outcome = outcome or (lambda _o: None)
        self.counts: dict[str, int] = {"sent": 0, "refused": 0, "error": 0, "redelivered": 0}
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
        except (ValueError, AttributeError) as e:
            spec = e
        if spec is not None:
            from producer.keys import QueueKeys, queue_of_key

            # The outbox entry is on the job's shard (producer/shards.py).
            shard = QueueKeys.for_queue(queue_of_key(row.stream) or self.settings.queue)
            self._dispatch(row.job_id, spec, result_json, shard.callbacks)

    def _dispatch(self, job_id: str, spec: Any, result_json: str, outbox: str) -> None:
        try:
            cb = CeleryCallback.model_validate(spec)
        except (ValueError, ValidationError) as e:
            log.warning("job %s: bad completion callback: %s", job_id, e)
            self._count("refused")
            self._executor.submit(self._confirm, job_id, outbox)
            return
        broker = cb.broker_url or self.settings.celery_broker_url
        if not broker or broker not in self.allowed:
            log.warning("job %s: callback %s refused: broker %s", job_id, cb.celery_task,
                        "not configured (SLOTFILL_CELERY_BROKER_URL)" if not broker
                        else "not allowed (SLOTFILL_CELERY_BROKERS)")
            self._count("refused")
            self._executor.submit(self._confirm, job_id, outbox)
            return
        fut = self._executor.submit(self._send, broker, cb, job_id, result_json, outbox)
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

    def _send(self, broker: str, cb: CeleryCallback, job_id: str, result_json: str,
              outbox: str) -> None:
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
        self._confirm(job_id, outbox)

    def _confirm(self, job_id: str, outbox: str) -> None:
        """Take the job out of the outbox: its callback needs no redelivery. Retried through
        a Redis stall for up to half the redelivery time (a peer would send it again)."""
        give_up = time.monotonic() + self.settings.celery_redeliver_seconds / 2
        delay = 0.1
        while True:
            try:
                self._redis.zrem(outbox, job_id)
                return
            except Exception as e:
                if time.monotonic() + delay > give_up or self._stop.is_set():
                    # Sent again later: a repeat (same task id), never a loss.
                    log.warning("job %s: callback sent, not confirmed (%s): it may repeat",
                                job_id, e)
                    return
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _sweep(self) -> None:
        """Send again what no sender confirmed (see the module docstring)."""
        period = max(0.2, self.settings.celery_redeliver_seconds / 4)
        while not self._stop.wait(period):
            try:
                self._redeliver()
            except Exception as e:  # Redis away: next time
                log.debug("callback sweep failed: %s", e)

    def _redeliver(self) -> None:
        from producer.shards import read_layout

        sec, usec = self._redis.time()
        now = int(sec) + int(usec) / 1e6
        for keys in read_layout(self._redis, self.settings.queue).every_keys:  # each shard's
            raw = self._claim(keys=[keys.callbacks], args=[
                repr(now), repr(now + self.settings.celery_redeliver_seconds), SWEEP_BATCH,
                keys.base])
            for i in range(0, len(raw), 3):
                job_id, spec, result = (x.decode() for x in raw[i:i + 3])
                log.info("job %s: callback never confirmed by its sender: sending it again",
                         job_id)
                self._count("redelivered")
                try:
                    self._dispatch(job_id, json.loads(spec), result, keys.callbacks)
                except ValueError:
                    self._executor.submit(self._confirm, job_id, keys.callbacks)

    def close(self, timeout: float | None = None) -> int:
        """Let queued sends finish (up to ``timeout``, default ``celery_send_timeout``);
        returns how many were still unsent (they stay in the outbox for a peer)."""
        self._stop.set()
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
        self._redis.close()
        return left
