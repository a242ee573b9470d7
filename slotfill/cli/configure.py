"""``slotfill configure``: a queue's limits and shard layout, kept in its config hash
(producer/queue_config.py, producer/shards.py). An operator's command: clients read both."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from producer import queue_config
from producer.connection import is_cluster
from producer.keys import QueueKeys
from producer.shards import queue_slot, read_layout
from slotfill.cli.connect import EXIT_USAGE, CliError, connect

RedisUrl = Annotated[str | None, typer.Option(help="Redis URL (default: SLOTFILL_REDIS_URL)")]
QueueOpt = Annotated[str | None, typer.Option("--queue", "-q",
                                              help="queue (default: SLOTFILL_QUEUE)")]


def configure_cmd(
    shards: Annotated[int | None, typer.Option(
        help="split the queue into N shards, each on its own hash slot (1: one again)")] = None,
    max_pending: Annotated[int | None, typer.Option(
        help="cap on unfinished jobs (per shard)")] = None,
    max_payload_bytes: Annotated[int | None, typer.Option(
        help="largest request body accepted")] = None,
    queue: QueueOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Set a queue's limits and shard layout; print its config as JSON. Workers pick up a
    new layout within one heartbeat; clients within a few seconds."""
    r, settings = connect(redis_url)
    name = queue or settings.queue
    try:
        written = queue_config.configure(r, QueueKeys.for_queue(name),
                                         max_pending, max_payload_bytes, shards)
    except ValueError as e:
        raise CliError(str(e), "see `slotfill configure --help`", EXIT_USAGE) from None
    layout = read_layout(r, name)
    shown = [{"name": n, "slot": queue_slot(n), **_master(r, n)} for n in layout.names]
    print(json.dumps({"queue": name, "written": written, "shards": shown}, indent=2))
    masters = [s["master"] for s in shown if "master" in s]
    if len(set(masters)) < len(masters):
        # Shards follow the cluster's slot map (producer/shards.py): they share a master
        # only when the cluster has fewer masters than shards.
        Console(stderr=True).print("[yellow]warning: some shards share a master[/yellow]")


def _master(r: Any, queue: str) -> dict[str, str]:
    """``{"master": host:port}`` of the cluster node serving the shard ({} off a cluster)."""
    if not is_cluster(r):
        return {}
    node = r.get_node_from_key(QueueKeys.for_queue(queue).base)
    return {"master": f"{node.host}:{node.port}"}
