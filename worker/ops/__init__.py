"""Everything operational a worker attaches to its feeder: the metrics endpoint, the job
transition log lines and Celery completion callbacks. One call from the runner."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from worker.ops.celery_bridge import CeleryBridge
from worker.ops.metrics import WorkerMetrics
from worker.ops.observability import attach_job_events

if TYPE_CHECKING:
    from worker.feeder import Feeder
    from worker.settings import WorkerSettings

log = logging.getLogger("slotfill.worker")


class Ops:
    def __init__(self, feeder: Feeder, settings: WorkerSettings) -> None:
        self.metrics = WorkerMetrics(feeder, settings)
        feeder.on_published.append(self.metrics.on_published)
        self.callbacks = CeleryBridge(settings, self.metrics.callback_outcome)
        feeder.on_published.append(self.callbacks.on_published)
        attach_job_events(feeder, settings)
        self.metrics.start_http()

    def close(self) -> None:
        unsent = self.callbacks.close()
        if unsent:
            log.warning("%d completion callbacks unsent at exit", unsent)
        self.metrics.close()


def install(feeder: Feeder, settings: WorkerSettings) -> Ops:
    return Ops(feeder, settings)
