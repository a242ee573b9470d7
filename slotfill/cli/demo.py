"""``slotfill demo``: an embedded local fleet (its own Redis, one worker) and a few hundred jobs."""

from __future__ import annotations

import os
import random
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
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer

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


def run_demo(model: str, n_jobs: int, engine: str, console: Console) -> int:
    with ExitStack() as stack:
        url = os.environ.get("SLOTFILL_REDIS_URL")
        if not url:
            console.print("starting a private redis-server ...")
            server = stack.enter_context(RedisServer())
            url = server.url
        workdir = Path(tempfile.mkdtemp(prefix="slotfill-demo-"))
        queue = f"demo-{os.getpid()}"
        settings: dict[str, str | int | float] = {"queue": queue, "engine": engine}
        if model:
            settings["model"] = model
        w = WorkerProcess(url, "demo-worker", workdir / "worker.log", **settings).start()
        stack.callback(w.stop)
        console.print(f"starting a worker ({model or 'generated tiny model'}; log "
                      f"{w.log_path}) ...")
        w.wait_ready()
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
        results = [client.result(i) for i in ids]
        tokens = sum(res.usage.completion_tokens for res in results if res)
        table = Table("job", "status", "tokens", "text")
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
    return 1
