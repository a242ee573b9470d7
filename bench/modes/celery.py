"""Parent side of the Celery modes: start a real Celery worker process, send the workload as
tasks (one request per task, or static batches of k), collect the results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import cpu
from bench.config import REPO_ROOT, BenchConfig
from bench.workload import Request


def _db_url(redis_url: str, db: int) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{db}"


def run_celery(cfg: BenchConfig, reqs: list[Request], run_dir: Path, redis_url: str,
               mode: str, batch_size: int,
               progress: Callable[[str, int, int], None],
               redis_pid: int | None = None) -> dict[str, Any]:
    broker, backend = _db_url(redis_url, 1), _db_url(redis_url, 2)
    env = dict(os.environ)
    env.update({"SLOTFILL_BENCH_RUN_DIR": str(run_dir), "SLOTFILL_BENCH_MODE": mode,
                "SLOTFILL_BENCH_BROKER": broker, "SLOTFILL_BENCH_BACKEND": backend,
                "PYTHONUNBUFFERED": "1"})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    ready = run_dir / f"{mode}.celery-ready"
    progress("starting celery worker engine", 0, len(reqs))
    t_load = time.time()
    with open(run_dir / f"{mode}.celery.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench.modes.celery_app", "worker", "--pool", "solo",
             "--concurrency", "1", "-Q", "slotfill-bench", "--loglevel", "WARNING",
             "-n", f"bench-{mode}@%h"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=REPO_ROOT)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {proc.returncode}; see "
                                   f"{run_dir / f'{mode}.celery.log'}")
            if time.time() - t_load > 1800:
                raise TimeoutError("celery worker not ready after 1800 s")
            time.sleep(0.2)
        startup = time.time() - t_load
        g = cpu.groups(proc.pid, redis_pid, os.getpid())
        return _measure(reqs, broker, backend, mode, batch_size, startup, run_dir, progress,
                        proc, g)
    finally:
        _stop(proc)


def _measure(reqs: list[Request], broker: str, backend: str, mode: str, batch_size: int,
             startup: float, run_dir: Path, progress: Callable[[str, int, int], None],
             proc: subprocess.Popen[bytes], cpu_groups: dict[str, list[Any]]) -> dict[str, Any]:
    from celery import Celery
    from celery.exceptions import TimeoutError as CeleryTimeout

    from bench.modes.celery_app import TASK

    client = Celery("slotfill_bench_client", broker=broker, backend=backend)
    client.conf.update(task_serializer="json", result_serializer="json",
                       accept_content=["json"])
    batches = [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]
    c0 = cpu.snapshot(cpu_groups)
    t0 = time.time()
    pending = []
    for b in batches:
        body = [{"index": q.index, "prompt": q.prompt, "max_tokens": q.max_tokens} for q in b]
        pending.append(client.send_task(TASK, args=[body, time.time()], queue="slotfill-bench"))
    records: list[dict[str, Any]] = []
    for res in pending:
        while True:
            try:
                records.extend(res.get(timeout=5.0))
                break
            except CeleryTimeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"celery worker exited with {proc.returncode}") from None
        progress("running", len(records), len(reqs))
    t1 = time.time()
    cpu_s = cpu.delta(c0, cpu.snapshot(cpu_groups))
    client.close()
    return {"t_start": t0, "t_end": t1, "startup_s": startup, "records": records,
            "steps_file": str(run_dir / f"{mode}.steps.jsonl"),
            "extra": {"batch_size": batch_size, "tasks": len(batches), "cpu_s": cpu_s}}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown: the worker is idle by now
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:  # engine processes left behind
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
