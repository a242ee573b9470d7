"""The ``slotfill`` command: run workers, submit and wait from a shell, run the demo."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="slotfill: a Redis-fed fleet of vLLM workers.", no_args_is_help=True,
                  add_completion=False)
console = Console()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("slotfill").setLevel(logging.INFO)


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="HF model name or directory; default: "
                                              "SLOTFILL_MODEL, else the generated tiny model")] = None,
    queue: Annotated[str | None, typer.Option(help="queue to pull from")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="engine batch slots")] = None,
    headroom: Annotated[int | None, typer.Option(help="extra jobs waiting in the engine")] = None,
    engine: Annotated[str | None, typer.Option(help="vllm | sim")] = None,
    load_format: Annotated[str | None, typer.Option(help="vLLM load format (dummy = random)")] = None,
) -> None:
    """Run one worker: an engine kept full from the queue. Other settings: SLOTFILL_*."""
    from worker.runner import EXIT_SETTINGS, run_worker
    from worker.settings import WorkerSettings

    overrides: dict[str, Any] = {k: v for k, v in {
        "model": model, "queue": queue, "redis_url": redis_url, "max_num_seqs": max_num_seqs,
        "headroom": headroom, "engine": engine, "load_format": load_format}.items()
        if v is not None}
    _setup_logging(True)
    try:
        settings = WorkerSettings(**overrides)
    except Exception as e:
        console.print(f"[red]bad settings:[/red] {e}")
        raise typer.Exit(EXIT_SETTINGS) from None
    from worker.ops.observability import configure_logging, init_sentry

    configure_logging(settings)
    init_sentry(settings)
    raise typer.Exit(run_worker(settings))


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="prompt text")],
    max_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option()] = 1.0,
    chat: Annotated[bool, typer.Option(help="send as one chat user message")] = False,
    wait: Annotated[bool, typer.Option(help="wait and print the result")] = False,
    stream: Annotated[bool, typer.Option(help="print the output as it is generated")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 60.0,
    queue: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Submit one job; print its id (or, with --wait, its result as JSON; with --stream, its
    text as it comes, then its status on stderr)."""
    from producer import Client, SlotfillError

    c = Client.from_url(**({"queue": queue} if queue else {}))
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                              "stream": stream}
    if chat:
        params["messages"] = [{"role": "user", "content": prompt}]
    else:
        params["prompt"] = prompt
    try:
        job = c.submit(**params)
        if stream:
            Console(stderr=True, highlight=False).print(f"job {job.id}")
            raise typer.Exit(_follow(c, job.id, None, timeout))
        if not wait:
            print(job.id)
            return
        print(c.wait(job.id, timeout=timeout).model_dump_json(indent=2))
    except SlotfillError as e:
        console.print(f"[red]{type(e).__name__}:[/red] {e}")
        raise typer.Exit(2) from None


@app.command(name="stream")
def stream_cmd(
    job_id: str,
    after: Annotated[str | None, typer.Option(help="resume after this stream entry id")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 600.0,
    queue: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Follow a job's output as it is generated (from the start, or after --after)."""
    from producer import Client

    c = Client.from_url(**({"queue": queue} if queue else {}))
    raise typer.Exit(_follow(c, job_id, after, timeout))


def _follow(c: Any, job_id: str, after: str | None, timeout: float) -> int:
    """Print a job's stream: text to stdout, restarts and the final status to stderr.
    Exit code 0 when it succeeded, 1 when it ended otherwise, 2 on a client error."""
    from producer import JobResult, Restarted, SlotfillError, TokenDelta
    from producer.streaming import FIRST_ID

    err = Console(stderr=True, highlight=False)
    last = after or FIRST_ID
    try:
        for event in c.stream(job_id, after=last, timeout=timeout):
            if isinstance(event, TokenDelta):
                # A worker without a tokenizer streams token ids only.
                sys.stdout.write(event.text if event.text
                                 else "".join(f"{t} " for t in event.token_ids))
                sys.stdout.flush()
                last = event.entry_id
            elif isinstance(event, Restarted):
                err.print(f"\n[yellow][restarted: attempt {event.attempt} on "
                          f"{event.worker or 'another worker'}; output starts over][/yellow]")
            elif isinstance(event, JobResult):
                sys.stdout.write("\n")
                note = f": {event.error.message}" if event.error else ""
                err.print(f"{event.status.value} ({event.finish_reason}, "
                          f"{event.usage.completion_tokens} tokens){note}")
                return 0 if event.ok else 1
    except SlotfillError as e:
        err.print(f"[red]{type(e).__name__}:[/red] {e} (resume with --after {last})")
        return 2
    return 1


@app.command(name="wait")
def wait_cmd(
    job_id: str,
    timeout: Annotated[float, typer.Option()] = 60.0,
    queue: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Block until a job finishes; print its result as JSON."""
    from producer import Client, SlotfillError

    c = Client.from_url(**({"queue": queue} if queue else {}))
    try:
        print(c.wait(job_id, timeout=timeout).model_dump_json(indent=2))
    except SlotfillError as e:
        console.print(f"[red]{type(e).__name__}:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def demo(
    model: Annotated[str | None, typer.Option(help="HF model (default: generated tiny model)")] = None,
    jobs: Annotated[int, typer.Option(help="jobs to submit")] = 300,
    engine: Annotated[str, typer.Option(help="vllm | sim")] = "vllm",
) -> None:
    """Start a local fleet (own Redis, one worker), push jobs through it, print results."""
    from slotfill.cli.demo import run_demo

    _setup_logging(False)
    sys.exit(run_demo(model or "", jobs, engine, console))


def _register_ops_commands() -> None:
    """``slotfill status``, ``slotfill dlq ...``, ``slotfill batch ...`` (slotfill/cli/status.py,
    slotfill/cli/batch.py)."""
    from slotfill.cli.batch import batch_app
    from slotfill.cli.status import dlq_app, status

    app.command(name="status")(status)
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(batch_app, name="batch")
    from slotfill.gateway.command import gateway_cmd

    app.command(name="gateway")(gateway_cmd)


_register_ops_commands()


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


if __name__ == "__main__":
    app()
