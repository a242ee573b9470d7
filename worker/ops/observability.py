"""Logs and errors: JSON log lines (optional), one line per job transition, Sentry.

Job transition lines go to the ``slotfill.jobs`` logger at INFO, one per transition this
worker performs: ``started`` (first delivery), ``reclaimed`` (taken over from a silent
peer), then ``succeeded`` / ``failed`` / ``cancelled`` / ``expired``. Each record carries
``event``, ``job_id``, ``queue``, ``worker``, ``attempt`` and ``delivery`` as attributes, so
the JSON formatter emits them as fields. No prompt or completion text is ever logged.

Sentry (``SLOTFILL_SENTRY_DSN``): unhandled exceptions and ERROR log records become events,
tagged ``queue`` and ``worker``, and ``job_id`` when they happen inside a job (the job's
asyncio task, a log record's ``job_id`` attribute, or a job id in the message). Stack-frame
variables, which may hold prompt text, are sent only with ``SLOTFILL_SENTRY_INCLUDE_PROMPTS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.claim import ClaimedJob
    from worker.feeder import Feeder
    from worker.settings import WorkerSettings

jobs_log = logging.getLogger("slotfill.jobs")

_JOB_IN_TEXT = re.compile(r"\bjob[ -]([0-9a-f]{32})\b")
_SENSITIVE_KEYS = {"prompt", "messages", "body", "text", "content", "token_ids"}
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


# -- logs ----------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and every ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(settings: WorkerSettings) -> None:
    """Switch every root handler to JSON lines when ``log_json`` is set."""
    logging.getLogger("slotfill").setLevel(logging.INFO)
    if not settings.log_json:
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        h.setFormatter(JsonFormatter())


class JobEvents:
    """Feeder listeners that write the job transition lines."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.queue = settings.queue
        self.worker = settings.consumer

    def _line(self, event: str, row: ClaimedJob, msg: str = "", **fields: Any) -> None:
        extra = {"event": event, "job_id": row.job_id, "queue": self.queue,
                 "worker": self.worker, "attempt": row.attempts, "delivery": row.deliveries,
                 **fields}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        jobs_log.info("job %s %s%s%s", row.job_id or f"<entry {row.entry}>", event,
                      f" {tail}" if tail else "", msg, extra=extra)

    def started(self, row: ClaimedJob) -> None:
        self._line("reclaimed" if row.deliveries > 1 else "started", row,
                   wait_s=round(max(0.0, time.time() - row.queued_at), 3))

    def published(self, row: ClaimedJob, status: str, result_json: str) -> None:
        fields: dict[str, Any] = {}
        try:
            res = json.loads(result_json)
            t = res.get("timings") or {}
            if t.get("queued_at") and t.get("finished_at"):
                fields["e2e_s"] = round(t["finished_at"] - t["queued_at"], 3)
            if res.get("usage"):
                fields["tokens"] = res["usage"].get("completion_tokens", 0)
            if res.get("error"):
                fields["error"] = res["error"].get("code")
        except (ValueError, AttributeError, TypeError):
            pass
        self._line(status, row, **fields)


def attach_job_events(feeder: Feeder, settings: WorkerSettings) -> JobEvents | None:
    if not settings.log_job_events:
        return None
    ev = JobEvents(settings)
    feeder.on_published.append(ev.published)
    feeder.on_started.append(ev.started)
    return ev


# -- Sentry --------------------------------------------------------------------------------

def _current_job_id() -> str | None:
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return None
    name = task.get_name() if task is not None else ""
    return name[4:] if name.startswith("job-") and not name.startswith("job-entry:") else None


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("[filtered]" if k in _SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def make_before_send(settings: WorkerSettings
                     ) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None]:
    include = settings.sentry_include_prompts

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        tags = event.setdefault("tags", {})
        tags.setdefault("queue", settings.queue)
        tags.setdefault("worker", settings.consumer)
        job_id = None
        record = hint.get("log_record")
        if record is not None:
            job_id = getattr(record, "job_id", None)
        job_id = job_id or _current_job_id()
        if not job_id:
            msg = (event.get("logentry") or {}).get("formatted") or event.get("message") or ""
            for exc in (event.get("exception") or {}).get("values") or []:
                msg += " " + str(exc.get("value") or "")
            m = _JOB_IN_TEXT.search(str(msg))
            job_id = m.group(1) if m else None
        if job_id:
            tags["job_id"] = job_id
        if not include:
            for key in ("extra", "contexts", "request"):
                if key in event:
                    event[key] = _scrub(event[key])
            for crumb in (event.get("breadcrumbs") or {}).get("values") or []:
                if "data" in crumb:
                    crumb["data"] = _scrub(crumb["data"])
        return event

    return before_send


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slotfill")
    except PackageNotFoundError:
        return "0+unknown"


def init_sentry(settings: WorkerSettings, transport: Any = None) -> bool:
    """Start the Sentry SDK when ``sentry_dsn`` is set. ``transport``: tests capture events."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        environment=settings.sentry_environment or None,
        release=f"slotfill@{_version()}",
        include_local_variables=settings.sentry_include_prompts,  # PII stays off by default
        max_request_body_size="never",
        before_send=make_before_send(settings),  # type: ignore[arg-type]
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        # No auto-enabled integrations (redis, celery, ...): their breadcrumbs and spans
        # could carry request bodies, and the worker needs none of them.
        auto_enabling_integrations=False,
        transport=transport,
    )
    scope = sentry_sdk.get_global_scope()
    scope.set_tag("queue", settings.queue)
    scope.set_tag("worker", settings.consumer)
    return True
