"""A backend's Celery app, for tests/test_celery_bridge.py: its task appends what it receives
to a file. Run as ``celery -A tests.celery_app worker --pool solo``."""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

app = Celery("slotfill_test_backend", broker=os.environ.get("CELERY_TEST_BROKER", "memory://"))
app.conf.update(task_serializer="json", accept_content=["json"], worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)


@app.task(name="backend.on_llm_result", bind=True)  # type: ignore[untyped-decorator]
def on_llm_result(self: Any, result: dict[str, Any]) -> None:
    with open(os.environ["CELERY_TEST_OUT"], "a") as f:
        f.write(json.dumps({"task_id": self.request.id, "queue":
                            (self.request.delivery_info or {}).get("routing_key"),
                            "result": result}) + "\n")
