"""Sentry and logs: events carry job id / queue / worker tags and no prompt text; one log line
per job transition; JSON logs.

The Sentry SDK is pointed at a capturing transport in-process, and, for a real worker
process, at a local HTTP server that stands in for Sentry's ingest endpoint."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from producer import Client, JobStatus
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer, free_port
from worker.ops.observability import JsonFormatter, init_sentry
from worker.settings import WorkerSettings

JOB = "0123456789abcdef0123456789abcdef"
SECRET = "SECRET-PROMPT-TEXT"


class Capture(Transport):
    events: ClassVar[list[dict[str, Any]]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            if item.type == "event" and item.payload.json is not None:
                Capture.events.append(item.payload.json)


@pytest.fixture
def sentry() -> Iterator[list[dict[str, Any]]]:
    Capture.events = []
    yield Capture.events
    sentry_sdk.get_client().close(timeout=0)
    sentry_sdk.init(default_integrations=False, auto_enabling_integrations=False)  # off again


def _settings(**kw: Any) -> WorkerSettings:
    return WorkerSettings(sentry_dsn="http://public@127.0.0.1:9/1", queue="tagged",
                          consumer="w-1", **kw)


def _fail_inside_a_job() -> None:
    log = logging.getLogger("slotfill.worker")

    async def job() -> None:
        prompt = SECRET  # a local that holds prompt text
        try:
            raise RuntimeError("engine said no")
        except RuntimeError:
            log.exception("job task failed after %d tokens", len(prompt))

    async def main() -> None:
        await asyncio.create_task(job(), name=f"job-{JOB}")

    asyncio.run(main())


def test_events_are_tagged_and_carry_no_prompt(sentry: list[dict[str, Any]]) -> None:
    assert init_sentry(_settings(), transport=Capture)
    _fail_inside_a_job()
    logging.getLogger("slotfill.worker").error("job %s: callback broker unreachable", "f" * 32)
    sentry_sdk.flush()
    assert len(sentry) == 2
    first, second = sentry
    assert first["tags"] == {"job_id": JOB, "queue": "tagged", "worker": "w-1"}
    assert second["tags"]["job_id"] == "f" * 32  # from the message when outside a job task
    assert SECRET not in json.dumps(sentry)
    frames = first["exception"]["values"][0]["stacktrace"]["frames"]
    assert all("vars" not in f for f in frames)


def test_prompts_only_when_enabled(sentry: list[dict[str, Any]]) -> None:
    assert init_sentry(_settings(sentry_include_prompts=True), transport=Capture)
    _fail_inside_a_job()
    sentry_sdk.flush()
    assert SECRET in json.dumps(sentry)


def test_no_dsn_no_sentry() -> None:
    assert not init_sentry(WorkerSettings(sentry_dsn=""))


def test_json_formatter_keeps_extras() -> None:
    rec = logging.LogRecord("slotfill.jobs", logging.INFO, __file__, 1, "job %s %s",
                            (JOB, "started"), None)
    rec.event, rec.job_id = "started", JOB
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == f"job {JOB} started" and out["event"] == "started"
    assert out["job_id"] == JOB and out["level"] == "info" and out["logger"] == "slotfill.jobs"


class _Ingest(BaseHTTPRequestHandler):
    events: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        for line in body.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event_id" in obj and "tags" in obj:
                _Ingest.events.append(obj)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_worker_process_reports_job_errors_and_logs_transitions(
        redis_server: RedisServer, queue: str, tmp_path: Path) -> None:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Ingest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Ingest.events = []
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    w = WorkerProcess(redis_server.url, f"sentry-{queue}", tmp_path / "w.log", queue=queue,
                      engine="sim", sentry_dsn=f"http://public@127.0.0.1:{port}/1",
                      celery_broker_url=dead_broker, celery_send_timeout=0.5,
                      log_json="true").start()
    try:
        w.wait_ready(60)
        c = Client.from_url(redis_server.url, queue=queue)
        job = c.submit(prompt=f"{SECRET} please", max_tokens=3,
                       callback={"celery_task": "app.on_result"})
        assert c.wait(job.id, timeout=30).status is JobStatus.succeeded
        wait_until(lambda: _Ingest.events, timeout=30, interval=0.1,
                   what="Sentry's event for the failed callback")
    finally:
        w.stop()
        server.shutdown()
    [event] = _Ingest.events
    assert event["tags"]["job_id"] == job.id
    assert event["tags"]["queue"] == queue and event["tags"]["worker"] == w.consumer
    assert SECRET not in json.dumps(event)
    lines = [json.loads(x) for x in w.log_path.read_text().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("job_id") == job.id and x.get("logger") == "slotfill.jobs"]
    assert [x["event"] for x in mine] == ["started", "succeeded"]
    assert all(x["queue"] == queue and x["worker"] == w.consumer for x in mine)
    assert SECRET not in w.log_path.read_text()
