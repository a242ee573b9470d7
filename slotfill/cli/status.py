"""``slotfill status`` (the fleet at a glance) and ``slotfill dlq`` (the dead-letter stream).

Everything here reads Redis only: run it from any machine that reaches the fleet's Redis.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import redis
import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from producer.queue_stats import QueueSnapshot, WorkerBeat, discover_queues, snapshot
from producer.settings import ClientSettings
from slotfill.cli.connect import connect
from slotfill.cli.dead_letters import DeadLetter, DeadLetters

__all__ = ["DeadLetters", "dlq_app", "status"]


def _console() -> Console:
    """A console per use, so the terminal width (``COLUMNS``) is read when printing."""
    return Console()


RedisUrl = Annotated[str | None, typer.Option(help="Redis URL (default: SLOTFILL_REDIS_URL)")]
QueueOpt = Annotated[str | None, typer.Option("--queue", "-q",
                                              help="queue (default: SLOTFILL_QUEUE)")]


def _connect(redis_url: str | None) -> tuple[redis.Redis, ClientSettings]:
    return connect(redis_url)


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


# -- status --------------------------------------------------------------------------------

def render(snaps: list[QueueSnapshot], now: float | None = None) -> Group:
    """``slotfill status`` in 80 columns (more with --json): workers, their engines, queues,
    and a warning for each queue no live worker pulls."""
    now = time.time() if now is None else now
    beats: list[tuple[str, WorkerBeat]] = [(s.queue, b) for s in snaps for b in s.workers]
    workers = _table("workers (live heartbeats; held: jobs held / capacity)",
                     "worker", "queue", "held", "run", "occ", "tok/s", "up", "state")
    engines = _table("engines (settings as each engine chose them)",
                     "worker", "model", "slots", "context", "tokens/step")
    for queue, b in beats:
        workers.add_row(
            b.name, queue, f"{int(b.num('in_flight'))}/{int(b.num('capacity'))}",
            str(int(b.num("running"))), f"{b.occupancy:.0%}",
            f"{b.num('output_tokens_per_s'):.0f}", _age(now - b.num("started_at", now)),
            "pulling" if b.fields.get("pulling", "1") == "1" else "draining",
        )
        engines.add_row(b.name, b.fields.get("model") or "tiny (generated)",
                        str(int(b.num("slots"))), _int(b.fields.get("max_model_len")),
                        _int(b.fields.get("max_num_batched_tokens")))
    if not beats:
        workers.add_row("(none)", *[""] * 7)
    queues = _table("queues (wait: not taken yet; ok/fail/canc/exp: finished jobs)",
                    "queue", "wkrs", "depth", "run", "wait", "oldest", "dead", "ok", "fail",
                    "canc", "exp")
    for s in snaps:
        fin = s.finished
        queues.add_row(s.queue + (f" ({len(s.shards)} shards)" if s.shards else ""),
                       str(len(s.workers)), str(s.depth), str(s.pending), str(s.lag),
                       _age(s.oldest_waiting_age), str(s.dead_letters),
                       str(fin.get("succeeded", 0)), str(fin.get("failed", 0)),
                       str(fin.get("cancelled", 0)), str(fin.get("expired", 0)))
    warnings = [Text(f"warning: queue {s.queue!r} has no live worker"
                     + (f"; {s.lag} job(s) wait for one" if s.lag else ""), style="yellow")
                for s in snaps if not s.workers]
    return Group(workers, *([engines] if beats else []), queues, *warnings)


def _table(title: str, *columns: str) -> Table:
    """Names and the model fold; numbers never wrap."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True)
    for i, col in enumerate(columns):
        text = i == 0 or col in ("queue", "model", "state")
        t.add_column(col, justify="left" if text else "right", overflow="fold",
                     no_wrap=not text or col == "state")
    return t


def _int(value: str | None) -> str:
    """A heartbeat number, or ``-`` where an older worker does not report it."""
    try:
        return str(int(float(value or "")))
    except ValueError:
        return "-"


def collect(r: redis.Redis, queues: list[str]) -> list[QueueSnapshot]:
    return [snapshot(r, q) for q in queues]


def status(
    queue: Annotated[list[str] | None, typer.Option(
        "--queue", "-q", help="queue to show (repeatable; default: every queue in Redis)")] = None,
    redis_url: RedisUrl = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
    count: Annotated[int, typer.Option(hidden=True, help="with --watch: stop after N frames")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Workers alive (heartbeats) with in-flight, occupancy and tokens/s; per queue depth,
    lag, oldest waiting job and dead letters."""
    r, settings = _connect(redis_url)

    def queues() -> list[str]:
        return list(queue) if queue else (discover_queues(r) or [settings.queue])

    if as_json:
        print(json.dumps([_as_dict(s) for s in collect(r, queues())], indent=2))
        return
    if not watch:
        _console().print(render(collect(r, queues())))
        return
    frames = 0
    try:
        with Live(render(collect(r, queues())), console=_console(), auto_refresh=False) as live:
            while True:
                frames += 1
                if count and frames >= count:
                    break
                time.sleep(interval)
                live.update(render(collect(r, queues())), refresh=True)
    except KeyboardInterrupt:
        pass


def _as_dict(s: QueueSnapshot) -> dict[str, Any]:
    return {
        "queue": s.queue, "depth": s.depth, "running": s.pending, "lag": s.lag,
        "oldest_waiting_s": round(s.oldest_waiting_age, 3), "dead_letters": s.dead_letters,
        "finished": s.finished,
        "streams": [{"priority": x.priority, "depth": x.depth, "pending": x.pending,
                     "lag": x.lag, "oldest_waiting_s": round(x.oldest_waiting_age, 3)}
                    for x in s.streams],
        "workers": [{"name": b.name, **b.fields} for b in s.workers],
        **({"shards": s.shards} if s.shards else {}),
    }


# -- dead letters --------------------------------------------------------------------------

dlq_app = typer.Typer(help="The dead-letter stream: entries delivered too often (poisoned) "
                      "or not jobs at all (malformed).", no_args_is_help=True)


def _dlq(redis_url: str | None, queue: str | None) -> DeadLetters:
    r, settings = _connect(redis_url)
    return DeadLetters(r, queue or settings.queue)


@dlq_app.command("list")
def dlq_list(
    queue: QueueOpt = None, redis_url: RedisUrl = None,
    limit: Annotated[int, typer.Option(help="most entries to show")] = 100,
) -> None:
    """Dead letters, oldest first."""
    dl = _dlq(redis_url, queue)
    items = dl.entries(limit)
    # 80 columns: the time is in the entry id, the priority in `dlq show`.
    t = Table(title=f"dead letters of {dl.keys.queue!r}: {dl.size()} (details: dlq show ID)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("id", no_wrap=True)
    t.add_column("job", no_wrap=True)
    t.add_column("reason", no_wrap=True)
    t.add_column("dlv", no_wrap=True, justify="right")
    t.add_column("body", overflow="ellipsis", no_wrap=True, min_width=6)
    for d in items:
        t.add_row(d.id, d.job or "(none)", d.fields.get("reason", ""),
                  d.fields.get("deliveries", ""), _preview(d.fields.get("body", "")))
    _console().print(t)


def _preview(body: str, n: int = 24) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


@dlq_app.command("show")
def dlq_show(
    ident: Annotated[str, typer.Argument(metavar="ID", help="dead-letter entry id or job id")],
    queue: QueueOpt = None, redis_url: RedisUrl = None,
) -> None:
    """One dead letter in full (body included) and its job's current record."""
    dl = _dlq(redis_url, queue)
    d = dl.get(ident)
    if d is None:
        _console().print(f"[red]no dead letter {ident!r} in queue {dl.keys.queue!r}[/red]")
        raise typer.Exit(1)
    out: dict[str, Any] = {"id": d.id, **d.fields}
    try:
        out["body"] = json.loads(d.fields.get("body", ""))
    except ValueError:
        pass
    if d.job:
        raw: Any = dl.r.hgetall(dl.shard_of(d).job(d.job))
        rec = {_s(k): _s(v) for k, v in (raw or {}).items()}
        if "result" in rec:
            try:
                rec["result"] = json.loads(rec["result"])
            except ValueError:
                pass
        out["job_record"] = rec or None
    print(json.dumps(out, indent=2, default=str))


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(metavar="[ID]...",
                                                    help="dead-letter entry ids or job ids")] = None,
    all_: Annotated[bool, typer.Option("--all", help="replay every dead letter")] = False,
    queue: QueueOpt = None, redis_url: RedisUrl = None,
) -> None:
    """Re-queue dead letters: each body goes back on its stream as a fresh entry for the
    same job id (atomically; its failed result is dropped, waiters wait again)."""
    dl = _dlq(redis_url, queue)
    if bool(ids) == all_:
        _console().print("[red]give dead-letter ids or --all (not both)[/red]")
        raise typer.Exit(2)
    targets: list[DeadLetter] = []
    missing: list[str] = []
    if all_:
        for page in dl.pages():
            targets.extend(page)
    else:
        for ident in ids or []:
            d = dl.get(ident)
            if d is None:
                missing.append(ident)
            else:
                targets.append(d)
    results = [dl.replay(d) for d in targets]
    for res in results:
        colour = "green" if res.outcome == "ok" else "red"
        _console().print(f"[{colour}]{res.outcome}[/{colour}] {res.dead_id} job {res.job or '-'} "
                      f"{res.detail}")
    for ident in missing:
        _console().print(f"[red]missing[/red] {ident}")
    ok = sum(1 for x in results if x.outcome == "ok")
    _console().print(f"{ok} replayed, {len(results) - ok + len(missing)} not")
    if ok < len(results) + len(missing):
        raise typer.Exit(1)
