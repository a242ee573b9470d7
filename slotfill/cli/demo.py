"""``slotfill demo``: an embedded local fleet (its own Redis, one worker) and a few hundred jobs."""

from __future__ import annotations

import os
import random
import re
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from producer import Client
from producer.connection import connect
from producer.keys import QueueKeys
from slotfill.cli.connect import EXIT_SETTINGS, CliError, ping
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer

START_TIMEOUT_S = 1800.0
"""A first start may download a model and compile kernels: generous, but not endless."""
TOPICS = ["the queue", "a worker", "the engine", "redis streams", "a full batch", "the gpu"]


def demo_requests(n: int, seed: int = 0) -> list[dict[str, object]]:
    """Mixed lengths: short and long prompts, 8..128 output tokens, some chat."""
    rng = random.Random(seed)
    reqs: list[dict[str, object]] = []
    for i in range(n):
        text = f"Tell me about {rng.choice(TOPICS)} " + " ".join(
            rng.choice(TOPICS) for _ in range(rng.randint(0, 30)))
        req: dict[str, object] = {"max_tokens": rng.randint(8, 128), "temperature": 0.8,
                                  "seed": i}
        if i % 5 == 0:
            req["messages"] = [{"role": "user", "content": text}]
        else:
            req["prompt"] = text
        reqs.append(req)
    return reqs


def _finished(r: redis.Redis, keys: QueueKeys) -> int:
    stats: dict[bytes, bytes] = r.hgetall(keys.stats)  # type: ignore[assignment]
    return sum(int(v) for k, v in stats.items() if k.startswith(b"finished_"))


def _last_line(w: WorkerProcess) -> str:
    lines = [x for x in w.tail(5).splitlines() if x.strip()]
    return lines[-1][-70:] if lines else ""


_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Exit)[A-Za-z]*: ")


def _last_error(w: WorkerProcess) -> str:
    """The worker log's last exception line (with its wrapped continuation), or its last
    line: what went wrong, without a screenful of traceback."""
    lines = w.tail(200).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _ERROR_LINE.match(lines[i]):
            tail = []
            for more in lines[i + 1:]:
                if not more.strip() or more.startswith((" ", "\t", "│", "╰")):
                    break
                tail.append(more.strip())
            return " ".join([lines[i].strip(), *tail])[:400]
    return _last_line(w)


def _wait_ready(w: WorkerProcess, console: Console, timeout: float = START_TIMEOUT_S) -> bool:
    """Until the worker's first heartbeat, showing the elapsed time and its latest log line
    (loading a model and compiling take minutes on a CPU); False, with the log's tail, when
    the worker exits or is not ready in time."""
    t0 = time.monotonic()
    next_note = 30.0  # without a terminal (CI logs) the spinner is silent: a line per 30 s
    with console.status("") as status:
        while True:
            try:
                w.wait_ready(timeout=1.0)
                break
            except TimeoutError:
                elapsed = time.monotonic() - t0
                if elapsed > timeout:
                    console.print(f"[red]worker not ready after {elapsed:.0f}s[/red]; its log "
                                  f"({w.log_path}) ends:\n{w.tail(15)}")
                    return False
                status.update(f"engine loading: {elapsed:.0f}s  [dim]{_last_line(w)}[/dim]")
                if not console.is_terminal and elapsed >= next_note:
                    console.print(f"engine loading: {elapsed:.0f}s")
                    next_note += 30.0
            except RuntimeError:
                code = w.proc.returncode if w.proc is not None else None
                console.print(f"[red]the worker exited ({code}) before it was ready:[/red] "
                              f"{_last_error(w)}\n[dim]full log: {w.log_path}[/dim]")
                return False
    console.print(f"worker ready after {time.monotonic() - t0:.0f}s")
    return True


def run_demo(model: str, n_jobs: int, engine: str, console: Console) -> int:
    with ExitStack() as stack:
        url = os.environ.get("SLOTFILL_REDIS_URL")
        if url:
            ping(url)
        else:
            console.print("starting a private redis-server ...")
            try:
                server = stack.enter_context(RedisServer())
            except RuntimeError as e:  # no redis-server binary, or it would not start
                raise CliError(str(e), code=EXIT_SETTINGS) from None
            url = server.url
        workdir = Path(tempfile.mkdtemp(prefix="slotfill-demo-"))
        queue = f"demo-{os.getpid()}"
        settings: dict[str, str | int | float] = {"queue": queue, "engine": engine}
        if model:
            settings["model"] = model
        if model:
            # The worker kit defaults to offline (the tiny model needs no hub); a named
            # model may have to be downloaded first.
            os.environ.setdefault("HF_HUB_OFFLINE", "0")
        w = WorkerProcess(url, "demo-worker", workdir / "worker.log", **settings).start()
        stack.callback(w.stop)
        console.print(f"starting a worker ({model or 'generated tiny model'}; log "
                      f"{w.log_path})")
        if not _wait_ready(w, console):
            return 1
        client = Client.from_url(url, queue=queue)
        keys = QueueKeys.for_queue(queue)
        r = connect(url)
        t0 = time.perf_counter()
        ids = client.submit_many(demo_requests(n_jobs))
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("jobs finished", total=len(ids))
            while (done := _finished(r, keys)) < len(ids):
                bar.update(task, completed=done)
                if w.proc is not None and w.proc.poll() is not None:
                    console.print(f"[red]worker exited[/red]\n{w.tail()}")
                    return 1
                time.sleep(0.2)
            bar.update(task, completed=len(ids))
        elapsed = time.perf_counter() - t0
        return _report(client, ids, elapsed, model, console)
    return 1


def _report(client: Client, ids: list[str], elapsed: float, model: str,
            console: Console) -> int:
    """The first results as a table, then the totals; exit 0 only if every job succeeded."""
    results = [client.result(i) for i in ids]
    tokens = sum(res.usage.completion_tokens for res in results if res)
    table = Table()
    for col in ("job", "status", "tokens"):
        table.add_column(col, no_wrap=True)
    table.add_column("text", no_wrap=True, overflow="ellipsis", max_width=44)
    for res in results[:5]:
        if res:
            table.add_row(res.id[:8], res.status.value, str(res.usage.completion_tokens),
                          res.text[:60].replace("\n", " "))
    console.print(table)
    if not model:
        console.print("[dim](the tiny model has random weights: its text is noise)[/dim]")
    ok = sum(1 for res in results if res and res.ok)
    console.print(f"{ok}/{len(ids)} succeeded in {elapsed:.1f}s: "
                  f"{len(ids) / elapsed:.1f} jobs/s, {tokens / elapsed:.0f} output tokens/s")
    return 0 if ok == len(ids) else 1
