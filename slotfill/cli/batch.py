"""``slotfill batch``: run an OpenAI Batch API input file through the queue.

Input lines: ``{"custom_id": "...", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": {...}}``. Output lines (succeeded requests, ``--out``):
``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <completion or
chat.completion object>}, "error": null}``. Error lines (``--errors``, default
``<out>.errors.jsonl``): the same with ``status_code`` 400 (bad request) or 500 (failed in
the worker) and an OpenAI error object as body, or ``response: null`` and
``error: {"code", "message"}`` for jobs cancelled, expired or whose result expired.

Resumable: run the same command again after an interrupt (Ctrl-C, kill -9, a crash). Each
line's job is submitted with the idempotency key ``batch:<batch id>:<hash of custom_id>`` and
recorded in the batch's ``custom_id → job id`` hash, so a line is never submitted twice;
lines already in the output files are skipped, a torn last line is cut, every other line gets
its result written; the batch id defaults to a hash of the input file's content."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, cast

import redis
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer import protocol, shards, waiting
from producer.acks import run_acked
from producer.keys import Priority, QueueKeys
from producer.schema import JobResult
from producer.scripts import batch_args, batched, source
from producer.settings import ClientSettings
from producer.shards import ShardLayout
from slotfill.cli.batch_format import (
    BatchFileError,
    Line,
    default_batch_id,
    done_custom_ids,
    errors_path_for,
    idempotency_key,
    invalid_line,
    output_line,
    read_input,
)
from slotfill.cli.connect import connect


def _console() -> Console:
    """A console per use, so the terminal width (``COLUMNS``) is read when printing."""
    return Console()

SUBMIT_CHUNK = 500
POLL_CHUNK = 1000
MAX_OUTSTANDING = 20_000
"""Submitted-but-unwritten lines held at once: bounds each poll pass over Redis."""


@dataclass
class BatchReport:
    batch_id: str
    total: int
    written_before: int = 0
    submitted: int = 0
    """Jobs submitted by this run (not counting ones an earlier run submitted)."""
    resumed: int = 0
    """Lines an earlier run had submitted whose results this run wrote."""
    succeeded: int = 0
    failed: int = 0
    invalid: int = 0


# -- the run -------------------------------------------------------------------------------

@dataclass
class _Writer:
    out: IO[str]
    err: IO[str]
    report: BatchReport
    on_line: Callable[[], None]
    on_written: Callable[[int], None] | None = None
    """Told the count after every line (a caller's progress hook)."""
    written: int = 0

    def write(self, ok: bool, obj: dict[str, Any]) -> None:
        f = self.out if ok else self.err
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        self.written += 1
        if ok:
            self.report.succeeded += 1
        else:
            self.report.failed += 1
        self.on_line()
        if self.on_written is not None:
            self.on_written(self.written)


@dataclass
class BatchRun:
    r: redis.Redis
    settings: ClientSettings
    queue: str
    batch_id: str
    lines: list[Line]
    keys: QueueKeys = field(init=False)
    layout: ShardLayout = field(init=False)
    """Where jobs go (producer/shards.py): each line by its idempotency key."""

    def __post_init__(self) -> None:
        self.keys = QueueKeys.for_queue(self.queue)
        self.layout = shards.read_layout(self.r, self.queue)
        self._submit = self.r.register_script(batched("submit_job"))
        self._wait_jobs = self.r.register_script(source("wait_jobs"))
        self._token = waiting.new_token()
        self._models: dict[str, str | None] = {}

    def model_of(self, worker: str | None) -> str | None:
        """The model the worker that ran a job serves, from its heartbeat (None: it is gone,
        or an unnamed worker); the generated tiny model is ``tiny``."""
        if not worker:
            return None
        if worker not in self._models:
            beat = self.r.hget(self.keys.worker(worker), "model")
            self._models[worker] = None if beat is None else (_s(beat) or "tiny")
        return self._models[worker]

    def touch(self, **fields: Any) -> None:
        pipe = self.r.pipeline(transaction=False)
        b = self.keys.batch(self.batch_id)
        pipe.hset(b, mapping={**{k: str(v) for k, v in fields.items()},
                              "updated_at": repr(time.time())})
        pipe.expire(b, self.settings.batch_ttl)
        pipe.expire(self.keys.batch_jobs(self.batch_id), self.settings.batch_ttl)
        pipe.execute()

    def register(self, input_path: Path, out: Path, errors: Path) -> None:
        b = self.keys.batch(self.batch_id)
        now = time.time()
        self.r.hsetnx(b, "created_at", repr(now))
        self.r.zadd(self.keys.batches, {self.batch_id: now}, nx=True)
        self.touch(input=str(input_path.resolve()), output=str(out.resolve()),
                   errors=str(errors.resolve()), total=len(self.lines), state="running")

    def known_jobs(self) -> dict[str, str]:
        raw = self.r.hgetall(self.keys.batch_jobs(self.batch_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    def submit(self, lines: list[Line]) -> tuple[dict[str, str], list[Line]]:
        """Submit (idempotently) in one batch-submit script call (a cluster refuses pipelined
        EVALSHA); returns custom_id → job id for those accepted and the lines refused because
        the queue is full."""
        calls = [shards.submit_call(self.layout, self.settings, line.request,
                                    idempotency_key(self.batch_id, line.custom_id))
                 for line in lines if line.request is not None]
        jobs = shards.submit_by_shard(calls, lambda k, part: protocol.parse_submit_many(
            run_acked(self.r, self._submit, *batch_args(part), self.settings.replica_acks,
                      self.settings.replica_ack_timeout_ms), k.queue))
        accepted: dict[str, str] = {}
        refused: list[Line] = []
        for line, job in zip(lines, jobs, strict=True):  # strict: every line had a request
            if job is None:  # the queue is full
                refused.append(line)
            else:
                accepted[line.custom_id] = job
        if accepted:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(self.keys.batch_jobs(self.batch_id), mapping=cast(Any, accepted))
            pipe.expire(self.keys.batch_jobs(self.batch_id), self.settings.batch_ttl)
            pipe.execute()
        return accepted, refused

    def poll(self, outstanding: dict[str, str]) -> Iterator[tuple[str, JobResult | None]]:
        """(custom_id, result) for finished jobs among the first POLL_CHUNK outstanding;
        result None when the job's record is gone (expired before it was collected)."""
        items = list(outstanding.items())[:POLL_CHUNK]
        pipe = self.r.pipeline(transaction=False)
        for _, job in items:
            key = self.layout.for_job(job).job(job)
            pipe.hget(key, "result")
            pipe.exists(key)
        replies = pipe.execute()
        for i, (cid, _) in enumerate(items):
            raw, exists = replies[2 * i], replies[2 * i + 1]
            if raw is not None:
                yield cid, JobResult.model_validate_json(raw)
            elif not exists:
                yield cid, None

    def wait_any(self, outstanding: dict[str, str], timeout: float) -> None:
        """Block until the oldest outstanding job finishes, or ``timeout`` (a ``wait_jobs``
        waiter on it; a result pushed for a job collected already only wakes the loop early)."""
        if not outstanding:
            return
        job = next(iter(outstanding.values()))
        keys = self.layout.for_job(job)
        key_list, args = waiting.register_args(keys, self._token, [job], timeout)
        if self._wait_jobs(keys=key_list, args=args)[0] == 1:
            self.r.blmpop(timeout, 1, keys.waiter(self._token), direction="LEFT", count=100)


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _sort_todo(todo: list[Line], known: dict[str, str], report: BatchReport, writer: _Writer
               ) -> tuple[dict[str, str], list[Line]]:
    """Answer invalid lines at once; returns the lines an earlier run submitted (custom id ->
    job id, to collect) and the rest to submit, reversed (pop() keeps input order)."""
    outstanding: dict[str, str] = {}
    to_submit: list[Line] = []
    for line in todo:
        if line.request is None:
            report.invalid += 1
            writer.write(False, invalid_line(line))
        elif line.custom_id in known:
            outstanding[line.custom_id] = known[line.custom_id]
            report.resumed += 1
        else:
            to_submit.append(line)
    to_submit.reverse()
    return outstanding, to_submit


def run_batch(
    r: redis.Redis, settings: ClientSettings, input_path: Path, out: Path,
    errors: Path | None = None, *, queue: str | None = None, batch_id: str | None = None,
    priority: Priority = Priority.low, progress: bool = True,
    on_written: Callable[[int], None] | None = None,
) -> BatchReport:
    """Submit every line not yet answered, write each result as it comes. Resumable."""
    errors = errors or errors_path_for(out)
    lines = read_input(input_path, priority, settings.max_payload_bytes)
    batch_id = batch_id or default_batch_id(input_path)
    run = BatchRun(r, settings, queue or settings.queue, batch_id, lines)
    report = BatchReport(batch_id, len(lines))
    done = done_custom_ids(out) | done_custom_ids(errors)
    report.written_before = sum(1 for line in lines if line.custom_id in done)
    run.register(input_path, out, errors)
    known = run.known_jobs()
    by_id = {line.custom_id: line for line in lines}
    todo = [line for line in lines if line.custom_id not in done]
    bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=_console(),
                   disable=not progress)
    with bar, open(out, "a", encoding="utf-8") as fo, open(errors, "a", encoding="utf-8") as fe:
        task = bar.add_task(f"{batch_id}", total=len(lines), completed=report.written_before)
        writer = _Writer(fo, fe, report, lambda: bar.advance(task), on_written)
        outstanding, to_submit = _sort_todo(todo, known, report, writer)
        backoff = 0.05
        while to_submit or outstanding:
            room = MAX_OUTSTANDING - len(outstanding)
            if to_submit and room > 0:
                chunk = [to_submit.pop() for _ in range(min(SUBMIT_CHUNK, room, len(to_submit)))]
                accepted, refused = run.submit(chunk)
                outstanding.update(accepted)
                report.submitted += len(accepted)
                to_submit.extend(reversed(refused))
                if refused:  # queue full: collect results, back off, try again
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                else:
                    backoff = 0.05
                bar.update(task, description=f"{batch_id} ({len(outstanding)} running)")
            got = 0
            for cid, res in run.poll(outstanding):
                job = outstanding.pop(cid)
                got += 1
                if res is None:
                    writer.write(False, {
                        "id": f"batch_req_{job}", "custom_id": cid, "response": None,
                        "error": {"code": "result_expired",
                                  "message": "the job's record expired before its result was "
                                             "collected (result_ttl)"}})
                else:
                    ok, obj = output_line(by_id[cid], res, run.model_of(res.worker))
                    writer.write(ok, obj)
            if got:
                run.touch(written=report.written_before + writer.written)
            elif outstanding and not (to_submit and len(outstanding) < MAX_OUTSTANDING):
                run.wait_any(outstanding, 0.5)
    run.touch(state="completed", written=report.written_before + writer.written,
              finished_at=repr(time.time()))
    return report


def batch_state(r: redis.Redis, queue: str, batch_id: str) -> dict[str, Any] | None:
    keys = QueueKeys.for_queue(queue)
    meta = {_s(k): _s(v) for k, v in r.hgetall(keys.batch(batch_id)).items()}
    if not meta:
        return None
    jobs = {_s(k): _s(v) for k, v in r.hgetall(keys.batch_jobs(batch_id)).items()}
    layout = shards.read_layout(r, queue)
    counts: dict[str, int] = {}
    ids = list(jobs.values())
    for start in range(0, len(ids), 1000):
        pipe = r.pipeline(transaction=False)
        for job in ids[start:start + 1000]:
            pipe.hget(layout.for_job(job).job(job), "status")
        for st in pipe.execute():
            name = _s(st) if st is not None else "expired_record"
            counts[name] = counts.get(name, 0) + 1
    return {"batch_id": batch_id, **meta, "submitted": len(jobs), "jobs": counts}


# -- CLI -----------------------------------------------------------------------------------

batch_app = typer.Typer(help="OpenAI Batch API files: submit a JSONL file, collect the "
                        "results as JSONL (resumable).", no_args_is_help=True)

RedisUrl = Annotated[str | None, typer.Option(help="Redis URL (default: SLOTFILL_REDIS_URL)")]
QueueOpt = Annotated[str | None, typer.Option("--queue", "-q",
                                              help="queue (default: SLOTFILL_QUEUE)")]


@batch_app.command("submit")
def batch_submit(
    input_file: Annotated[Path, typer.Argument(help="input JSONL (custom_id, method, url, body)",
                                               exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="output JSONL (succeeded lines)")],
    errors: Annotated[Path | None, typer.Option(
        help="error JSONL (default: <out>.errors.jsonl)")] = None,
    batch_id: Annotated[str | None, typer.Option(
        help="batch id (default: hash of the input file; the same id resumes)")] = None,
    priority: Annotated[Priority, typer.Option(help="job priority")] = Priority.low,
    queue: QueueOpt = None, redis_url: RedisUrl = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Submit every line, write each result as it arrives. Re-run the same command after an
    interrupt: nothing is submitted twice and nothing is lost."""
    r, settings = connect(redis_url)
    if batch_id is not None and not all(ch.isalnum() or ch in "_.-" for ch in batch_id):
        _console().print("[red]batch id: letters, digits, _ . - only[/red]")
        raise typer.Exit(2)
    try:
        rep = run_batch(r, settings, input_file, out, errors, queue=queue, batch_id=batch_id,
                        priority=priority, progress=progress and _console().is_terminal)
    except BatchFileError as e:
        _console().print(f"[red]not a valid batch file, nothing submitted:[/red]\n{e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _console().print("[yellow]interrupted: run the same command again to resume[/yellow]")
        raise typer.Exit(130) from None
    _console().print(f"batch {rep.batch_id}: {rep.total} lines, {rep.written_before} already "
                  f"written, {rep.submitted} submitted now, {rep.resumed} resumed; "
                  f"{rep.succeeded} succeeded, {rep.failed} failed ({rep.invalid} invalid)")


@batch_app.command("status")
def batch_status_cmd(
    batch_id: Annotated[str | None, typer.Argument(help="batch id (default: list batches)")] = None,
    queue: QueueOpt = None, redis_url: RedisUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """One batch's progress (jobs by status), or the list of batches of the queue."""
    r, settings = connect(redis_url)
    q = queue or settings.queue
    keys = QueueKeys.for_queue(q)
    if batch_id is None:
        ids = [_s(x) for x in r.zrange(keys.batches, 0, -1)]
        rows = []
        for b in ids:
            meta = {_s(k): _s(v) for k, v in r.hgetall(keys.batch(b)).items()}
            if meta:
                rows.append({"batch_id": b, **meta})
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        t = Table(title=f"batches of queue {q!r}", title_justify="left")
        t.add_column("batch", no_wrap=True, min_width=max([5, *(len(b) for b in ids)]))
        for col in ("state", "lines", "written"):
            t.add_column(col, no_wrap=True)
        for col in ("input", "output"):
            t.add_column(col, overflow="fold")
        for row in rows:
            t.add_row(row["batch_id"], row.get("state", ""), row.get("total", ""),
                      row.get("written", "0"), row.get("input", ""), row.get("output", ""))
        _console().print(t)
        return
    st = batch_state(r, q, batch_id)
    if st is None:
        _console().print(f"[red]no batch {batch_id!r} in queue {q!r}[/red]")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(st, indent=2))
        return
    t = Table(title=f"batch {batch_id}", title_justify="left", show_header=False)
    for k in ("state", "total", "submitted", "written", "input", "output", "errors"):
        t.add_row(k, str(st.get(k, "")))
    for k, v in sorted(st["jobs"].items()):
        t.add_row(f"jobs {k}", str(v))
    _console().print(t)
