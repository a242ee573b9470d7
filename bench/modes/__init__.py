"""One module per mode; :func:`run_mode` picks the one a mode name asks for.

Every mode returns the same raw shape (``t_start``, ``t_end``, ``startup_s``, per-request
``records``, ``steps_file``, ``extra``), which bench/analysis.py turns into its summary.
Modules import their heavy dependencies (vLLM, Celery, psutil) only when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import FLEET_MODES, BenchConfig, stream_interval
from bench.workload import Request

Progress = Callable[[str, int, int], None]
"""(phase, done, total) of the running mode."""


@dataclass
class ModeRun:
    """What a mode gets: the run's settings and workload, where to write, the private Redis."""

    cfg: BenchConfig
    reqs: list[Request]
    run_dir: Path
    redis_url: str
    redis_pid: int | None
    progress: Progress
    gpu: bool


@dataclass
class ModeResult:
    raw: dict[str, Any]
    capacity: int | None
    """Jobs held in flight (slots + headroom) where the refill latency is defined."""
    reqs: list[Request]
    """The requests the mode ran (the per-request Celery mode runs a prefix)."""


def run_mode(mode: str, run: ModeRun) -> ModeResult:
    cfg, reqs = run.cfg, run.reqs
    held = cfg.engine.max_num_seqs + cfg.engine.headroom
    if mode in ("offline", "asyncio"):
        from bench.modes.inproc import run_inproc

        raw = run_inproc(mode, run.run_dir, run.progress, len(reqs))
        return ModeResult(raw, held if mode == "asyncio" else None, reqs)
    if mode == "offline_split":
        from bench.modes.inproc import run_inproc_split

        if not cfg.gpus:
            raise ValueError("offline_split needs --gpus (one engine per listed GPU)")
        raw = run_inproc_split(run.run_dir, cfg.gpus, run.progress, len(reqs))
        return ModeResult(raw, None, reqs)
    if mode == "slotfill":
        from bench.modes.slotfill import run_slotfill

        raw = run_slotfill(cfg, reqs, run.run_dir, run.redis_url, run.progress, run.redis_pid)
        return ModeResult(raw, held, reqs)
    interval = stream_interval(mode)
    if interval is not None:
        from bench.modes.stream import run_stream

        raw = run_stream(cfg, reqs, run.run_dir, run.redis_url, run.progress, run.redis_pid,
                         interval)
        return ModeResult(raw, held, reqs)
    if mode in FLEET_MODES:
        from bench.modes.fleet import run_fleet

        raw = run_fleet(cfg, mode, reqs, run.run_dir, run.redis_url, run.progress,
                        run.redis_pid, run.gpu)
        raw["mode"] = mode
        return ModeResult(raw, None, reqs)
    if mode in ("celery_batch", "celery_per_request"):
        from bench.modes.celery import run_celery

        sub = reqs if mode == "celery_batch" else reqs[:cfg.celery_requests]
        size = cfg.batch_size if mode == "celery_batch" else 1
        raw = run_celery(cfg, sub, run.run_dir, run.redis_url, mode, size, run.progress,
                         run.redis_pid)
        return ModeResult(raw, None, sub)
    raise ValueError(f"unknown mode {mode!r}")
