"""``slotfill submit | wait | stream | cancel``: one job from a shell."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from producer import Client, JobResult, Moved, Restarted, SlotfillError, TokenDelta
from producer.streaming import FIRST_ID
from slotfill.cli.connect import (
    EXIT_JOB_FAILED,
    EXIT_USAGE,
    CliError,
    live_workers,
    locate_job,
    settings_for,
)

RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", help="Redis URL (default: SLOTFILL_REDIS_URL, else redis://localhost:6379/0)")]
QueueOpt = Annotated[str | None, typer.Option(
    "--queue", "-q", help="queue (default: SLOTFILL_QUEUE, else 'default')")]
JobQueueOpt = Annotated[str | None, typer.Option(
    "--queue", "-q", help="the job's queue (default: searched among the known queues)")]
Timeout = Annotated[float, typer.Option(help="seconds to wait")]
JobId = Annotated[str, typer.Argument(metavar="ID", help="job id (from submit)")]


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _client(redis_url: str | None, queue: str | None) -> Client:
    settings = settings_for(redis_url, queue)
    return Client.from_url(settings.redis_url, queue=settings.queue)


def _job_client(redis_url: str | None, queue: str | None, job_id: str) -> Client:
    """A client whose default queue is the one holding ``job_id``."""
    c = _client(redis_url, queue)
    found = locate_job(c.redis, job_id, c.settings.queue, explicit=queue is not None)
    if found != c.settings.queue:
        c.settings = c.settings.model_copy(update={"queue": found})
    return c


def _warn_unserved(c: Client) -> None:
    if live_workers(c.redis, c.settings.queue) == 0:
        _err().print(f"[yellow]warning: queue {c.settings.queue!r} has no live worker; the job "
                     "waits until one pulls it (`slotfill status` lists queues)[/yellow]")


def _print_result(res: JobResult) -> None:
    print(res.model_dump_json(indent=2))
    if not res.ok:
        raise typer.Exit(EXIT_JOB_FAILED)


def submit(
    prompt: Annotated[str, typer.Argument(help="prompt text")],
    max_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    chat: Annotated[bool, typer.Option(help="send as one chat user message")] = False,
    wait: Annotated[bool, typer.Option(help="wait and print the result")] = False,
    stream: Annotated[bool, typer.Option(help="print the output as it is generated")] = False,
    timeout: Timeout = 60.0,
    queue: QueueOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Submit one job; print its id (--wait: its result as JSON; --stream: its text as it
    comes, then its status on stderr)."""
    c = _client(redis_url, queue)
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                              "stream": stream}
    if chat:
        params["messages"] = [{"role": "user", "content": prompt}]
    else:
        params["prompt"] = prompt
    try:
        job = c.submit(**params)
    except SlotfillError as e:
        raise CliError(f"{type(e).__name__}: {e}") from None
    _warn_unserved(c)
    if stream:
        _err().print(f"job {job.id}")
        raise typer.Exit(_follow(c, job.id, None, timeout))
    if not wait:
        print(job.id)
        return
    try:
        res = c.wait(job.id, timeout=timeout)
    except SlotfillError as e:
        raise CliError(f"{type(e).__name__}: {e}", f"job {job.id} is still queued") from None
    _print_result(res)


def stream_cmd(
    job_id: JobId,
    after: Annotated[str | None, typer.Option(help="resume after this stream entry id")] = None,
    timeout: Timeout = 600.0,
    queue: JobQueueOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Follow a job's output as it is generated (from the start, or after --after)."""
    c = _job_client(redis_url, queue, job_id)
    raise typer.Exit(_follow(c, job_id, after, timeout))


def _follow(c: Client, job_id: str, after: str | None, timeout: float) -> int:
    """Print a job's stream: text to stdout, restarts and the final status to stderr.
    Exit code 0 when it succeeded, 1 when it ended otherwise, 2 on a client error.
    A delta without text is held: the detokenizer holds back the first bytes of a character
    (the text comes with a later delta), or the worker has no tokenizer, whose output,
    token ids, is printed when the job ends without text."""
    err = _err()
    last = after or FIRST_ID
    held: list[int] = []
    try:
        for event in c.stream(job_id, after=last, timeout=timeout):
            if isinstance(event, TokenDelta):
                if event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    held.clear()
                else:
                    held.extend(event.token_ids)
                last = event.entry_id
            elif isinstance(event, Restarted):
                held.clear()
                err.print(f"\n[yellow][restarted: attempt {event.attempt} on "
                          f"{event.worker or 'another worker'}; output starts over][/yellow]")
            elif isinstance(event, Moved):
                err.print(f"\n[yellow][moved: attempt {event.attempt} on "
                          f"{event.worker or 'another worker'} goes on from token "
                          f"{event.at}][/yellow]")
            elif isinstance(event, JobResult):
                if held and not event.text:
                    sys.stdout.write("".join(f"{t} " for t in held))
                sys.stdout.write("\n")
                note = f": {event.error.message}" if event.error else ""
                err.print(f"{event.status.value} ({event.finish_reason}, "
                          f"{event.usage.completion_tokens} tokens){note}")
                return 0 if event.ok else EXIT_JOB_FAILED
    except SlotfillError as e:
        err.print(f"slotfill: {type(e).__name__}: {e} (resume with --after {last})")
        return EXIT_USAGE
    return EXIT_JOB_FAILED


def wait_cmd(
    job_id: JobId,
    timeout: Timeout = 60.0,
    queue: JobQueueOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Block until a job finishes; print its result as JSON (exit 1 if it did not succeed)."""
    c = _job_client(redis_url, queue, job_id)
    if c.result(job_id) is None:
        _warn_unserved(c)
    try:
        res = c.wait(job_id, timeout=timeout)
    except SlotfillError as e:
        raise CliError(f"{type(e).__name__}: {e}",
                       f"queue {c.settings.queue!r}; `slotfill status` shows its workers") from None
    _print_result(res)


def cancel_cmd(
    job_id: JobId,
    queue: JobQueueOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Cancel a job: prints cancelled (was queued), requested (running: aborted within one
    engine step) or finished (too late: exit 1)."""
    c = _job_client(redis_url, queue, job_id)
    outcome = c.cancel(job_id)
    print(f"{outcome} {job_id} (queue {c.settings.queue})")
    if outcome not in ("cancelled", "requested"):
        raise typer.Exit(EXIT_JOB_FAILED)
