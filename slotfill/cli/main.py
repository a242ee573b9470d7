"""The ``slotfill`` command: run workers, submit and wait from a shell, run the demo.

Every mistake a user can make at a shell ends as one line with a hint and a documented exit
code (slotfill/cli/connect.py; README, "Exit codes"), never a traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import redis
import typer
from rich.console import Console

from slotfill.cli import jobs
from slotfill.cli.connect import EXIT_REDIS, EXIT_SETTINGS, CliError, ping, redis_error

HELP = ("slotfill: a Redis-fed fleet of vLLM workers.\n\nExit codes: 0 ok, 1 the job did not "
        "succeed, 2 usage or client error, 3 engine dead, 4 bad settings or a missing extra, "
        "5 Redis unreachable or refused the credentials.")
app = typer.Typer(help=HELP, no_args_is_help=True,
                  add_completion=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()


def _version(value: bool) -> None:
    if value:
        try:
            print(f"slotfill {version('slotfill')}")
        except PackageNotFoundError:
            print("slotfill (not installed: running from a source tree)")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    """Options of every command."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("slotfill").setLevel(logging.INFO)


def _check_worker_install(engine: str) -> None:
    """The worker extras are there (the light install has only the client and the CLI)."""
    needed = ["prometheus_client", "sentry_sdk"] + (["vllm"] if engine == "vllm" else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"slotfill worker needs the worker extra (missing: {', '.join(missing)})",
                       "pip install 'slotfill[worker]' on a GPU machine, "
                       "'slotfill[worker-cpu]' without one", EXIT_SETTINGS)


def _check_celery(settings: Any) -> None:
    if (settings.celery_broker_url or settings.celery_brokers) and \
            importlib.util.find_spec("celery") is None:
        raise CliError("SLOTFILL_CELERY_BROKER_URL is set but Celery is not installed",
                       "pip install 'slotfill[celery]'", EXIT_SETTINGS)


@app.command()
def worker(
    model: Annotated[str | None, typer.Option(help="HF model name or directory; default: "
                                              "SLOTFILL_MODEL, else the generated tiny model")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q", help="queue to pull from")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        help="engine batch slots (default: vLLM's choice)")] = None,
    headroom: Annotated[int | None, typer.Option(help="extra jobs waiting in the engine")] = None,
    engine: Annotated[str | None, typer.Option(help="vllm | sim")] = None,
    load_format: Annotated[str | None, typer.Option(help="vLLM load format (dummy = random)")] = None,
) -> None:
    """Run one worker: an engine kept full from the queue. Other settings: SLOTFILL_*."""
    from worker.settings import WorkerSettings

    overrides: dict[str, Any] = {k: v for k, v in {
        "model": model, "queue": queue, "redis_url": redis_url, "max_num_seqs": max_num_seqs,
        "headroom": headroom, "engine": engine, "load_format": load_format}.items()
        if v is not None}
    try:
        settings = WorkerSettings(**overrides)
    except ValueError as e:
        raise CliError(f"bad settings: {' '.join(str(e).split())}", "see README, Settings",
                       EXIT_SETTINGS) from None
    _check_worker_install(settings.engine)
    _check_celery(settings)
    # Before the engine: a wrong URL or password must not cost minutes of model loading.
    ping(settings.redis_url)
    from worker.ops.observability import configure_logging, init_sentry
    from worker.runner import run_worker

    _setup_logging(True)
    configure_logging(settings)
    init_sentry(settings)
    raise typer.Exit(run_worker(settings))


@app.command()
def demo(
    model: Annotated[str | None, typer.Option(help="HF model (default: generated tiny model)")] = None,
    jobs_: Annotated[int, typer.Option("--jobs", help="jobs to submit")] = 300,
    engine: Annotated[str, typer.Option(help="vllm | sim")] = "vllm",
) -> None:
    """Start a local fleet (own Redis, one worker), push jobs through it, print results."""
    from slotfill.cli.demo import run_demo

    _setup_logging(False)
    raise typer.Exit(run_demo(model or "", jobs_, engine, console))


def _register_commands() -> None:
    """Job commands (slotfill/cli/jobs.py); ``status``, ``dlq ...`` (status.py); ``batch ...``
    (batch.py)."""
    from slotfill.cli.batch import batch_app
    from slotfill.cli.status import dlq_app, status

    app.command()(jobs.submit)
    app.command(name="wait")(jobs.wait_cmd)
    app.command(name="stream")(jobs.stream_cmd)
    app.command(name="cancel")(jobs.cancel_cmd)
    app.command(name="status")(status)
    from slotfill.cli.configure import configure_cmd

    app.command(name="configure")(configure_cmd)
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(batch_app, name="batch")
    from slotfill.gateway.command import gateway_cmd

    app.command(name="gateway")(gateway_cmd)


_register_commands()


def run() -> None:
    """``app()`` with every expected failure as one line on stderr and its exit code."""
    try:
        app()
    except CliError as e:
        sys.stderr.write(e.line() + "\n")
        sys.exit(e.code)
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as e:
        sys.stderr.write(redis_error(_url_in_use(), e).line() + "\n")
        sys.exit(EXIT_REDIS)
    except KeyboardInterrupt:
        sys.stderr.write("slotfill: interrupted\n")
        sys.exit(130)


def _url_in_use() -> str:
    for i, arg in enumerate(sys.argv):
        if arg == "--redis-url" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--redis-url="):
            return arg.split("=", 1)[1]
    from producer.settings import ClientSettings

    return ClientSettings().redis_url
