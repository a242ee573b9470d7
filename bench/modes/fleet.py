"""Fleet modes: several ``slotfill worker`` processes on one queue, one admission policy.

``fleet`` runs the engine-aware admission (worker/admission.py), ``fleet_fixed`` the fixed
count it replaced; same workload, same engines. Besides the usual figures (over the whole
fleet) each worker reports its share of the jobs, of the prompt and output tokens and of the
long prompts, its mean occupancy and free-slot steps (until the last job left Redis, so a
worker idle while a peer still hoards unstarted jobs counts as idle), how long its jobs sat
pulled but not started (``pulled → first token``: the job's ``started_at`` is taken when
the read returns, its first token when the engine ran it) and when its last job finished.

Workers start one after another: engines sharing a GPU must each profile its memory with
the others' already allocated (and each needs ``--gpu-memory-utilization`` ≈ 0.9 / workers).
With ``--gpus 0,1`` each worker sees only its own GPU (``CUDA_VISIBLE_DEVICES``), they start
together, and the report adds ``scaling`` = fleet out tok/s / (workers x offline out tok/s).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.analysis import load_steps, mean_occupancy, pct, slot_idle
from bench.config import FLEET_MODES, BenchConfig
from bench.modes.slotfill import QUEUE, measure
from bench.workload import Request
from slotfill.testing.fleet import WorkerProcess

GPU_MEMORY_SHARE = 0.92
"""Most GPU memory the fleet's engines may claim together."""


def run_fleet(cfg: BenchConfig, mode: str, reqs: list[Request], run_dir: Path,
              redis_url: str, progress: Callable[[str, int, int], None],
              redis_pid: int | None, gpu: bool) -> dict[str, Any]:
    if gpu and cfg.engine.engine == "vllm":
        check_gpu_memory(cfg)
    workers = fleet_workers(cfg, mode, run_dir, redis_url)
    n = len(workers)
    bind = _cpu_bind(workers, gpu or cfg.engine.engine != "vllm")
    t_load = time.time()
    try:
        if cfg.gpus and max(engines_per_gpu(cfg).values()) == 1:  # none profiles beside another
            progress(f"starting {n} workers", 0, len(reqs))
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready(timeout=1800)
        else:
            for i, w in enumerate(workers):
                progress(f"starting worker {i + 1}/{n}", 0, len(reqs))
                w.start().wait_ready(timeout=1800)
        startup = time.time() - t_load
        raw = measure(reqs, workers, redis_url, startup, None, progress,
                      _cpu_groups(workers, redis_pid))
    finally:
        for w in workers:
            w.stop()
    raw["worker_steps"] = {w.consumer: w.env["SLOTFILL_STEP_LOG"] for w in workers}
    raw["extra"]["cpu_bind"] = bind
    raw["extra"]["gpus"] = [w.env.get("CUDA_VISIBLE_DEVICES") for w in workers]
    return raw


def visible_devices(entry: str) -> str:
    """A ``--gpus`` entry as ``CUDA_VISIBLE_DEVICES``: ``1`` -> ``1``, ``0+1`` -> ``0,1``."""
    return ",".join(p.strip() for p in entry.split("+"))


def fleet_workers(cfg: BenchConfig, mode: str, run_dir: Path,
                  redis_url: str) -> list[WorkerProcess]:
    """The fleet's workers, not started: ``--workers`` of them seeing what the bench sees, or
    one per ``--gpus`` entry, each seeing only its GPU(s)."""
    settings = {**cfg.engine.worker_settings(cfg.model_path), "admission": FLEET_MODES[mode]}
    n = len(cfg.gpus) or cfg.workers
    workers = [WorkerProcess(redis_url, f"{mode}-w{i + 1}", run_dir / f"{mode}.w{i + 1}.log",
                             queue=QUEUE, step_log=str(run_dir / f"{mode}.w{i + 1}.steps.jsonl"),
                             engine_hang_seconds=900, **settings)
               for i in range(n)]
    for w, entry in zip(workers, cfg.gpus, strict=False):
        w.env["CUDA_VISIBLE_DEVICES"] = visible_devices(entry)
    return workers


def engines_per_gpu(cfg: BenchConfig) -> Counter[str]:
    """``--gpus``: how many of the fleet's engines each listed GPU holds."""
    return Counter(g for e in cfg.gpus for g in visible_devices(e).split(","))


def check_gpu_memory(cfg: BenchConfig) -> None:
    """Refuses engines that would claim more than ``GPU_MEMORY_SHARE`` of one GPU together:
    ``--workers`` engines share the bench's GPU; with ``--gpus``, those listing the same GPU."""
    util = cfg.engine.gpu_memory_utilization
    per_gpu = engines_per_gpu(cfg)
    most = max(per_gpu.values()) if per_gpu else cfg.workers
    if most * util > GPU_MEMORY_SHARE:
        raise ValueError(f"{most} engines x gpu_memory_utilization {util} > "
                         f"{GPU_MEMORY_SHARE} of one GPU: pass --gpu-memory-utilization "
                         f"{0.9 / most:.2f}" + ("" if cfg.gpus else " or one GPU each (--gpus)"))


def _cpu_bind(workers: list[WorkerProcess], skip: bool) -> list[str] | None:
    """CPU engines: one core each. vLLM's ``auto`` binding puts every engine on the same
    core (measured here: core 0, reserving core 1), so two engines would halve each other.
    Left alone on a GPU, for the sim, or when VLLM_CPU_OMP_THREADS_BIND is set."""
    if skip or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return None
    cores = os.cpu_count() or 1
    for i, w in enumerate(workers):
        w.env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % cores)
    return [w.env["VLLM_CPU_OMP_THREADS_BIND"] for w in workers]


def _cpu_groups(workers: list[WorkerProcess], redis_pid: int | None) -> dict[str, list[Any]]:
    import psutil  # type: ignore[import-untyped]

    fronts = [psutil.Process(w.proc.pid) for w in workers if w.proc is not None]
    out: dict[str, list[Any]] = {
        "frontend": fronts,
        "engine": [c for f in fronts for c in f.children(recursive=True)],
        "client": [psutil.Process(os.getpid())]}
    if redis_pid:
        out["redis"] = [psutil.Process(redis_pid)]
    return out


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def per_worker(raw: dict[str, Any], slots: int, long_from: int) -> dict[str, dict[str, Any]]:
    """Each worker's share and engine figures (see the module docstring)."""
    recs: list[dict[str, Any]] = raw["records"]
    t0, t1 = raw["t_start"], raw["t_end"]
    last_start = max((r["started"] for r in recs), default=t0)
    totals = {k: sum(r[k] for r in recs) for k in ("prompt_tokens", "output_tokens")}
    n_long = sum(1 for r in recs if long_from and r["prompt_tokens"] >= long_from)
    out: dict[str, dict[str, Any]] = {}
    for name, steps_path in sorted(raw["worker_steps"].items()):
        mine = [r for r in recs if r["worker"] == name]
        steps = load_steps(steps_path)
        first_step = next((s["t"] for s in steps if s["t"] >= t0), t0)
        held = [r["first_token"] - r["started"] for r in mine if r.get("first_token")]
        long_jobs = sum(1 for r in mine if long_from and r["prompt_tokens"] >= long_from)
        idle = slot_idle(steps, first_step, last_start, slots)
        out[name] = {
            "jobs": len(mine), "jobs_share": _share(len(mine), len(recs)),
            "output_tokens": sum(r["output_tokens"] for r in mine),
            "output_tokens_share": _share(sum(r["output_tokens"] for r in mine),
                                          totals["output_tokens"]),
            "prompt_tokens_share": _share(sum(r["prompt_tokens"] for r in mine),
                                          totals["prompt_tokens"]),
            "long_prompts": long_jobs, "long_prompts_share": _share(long_jobs, n_long),
            "mean_occupancy": mean_occupancy(steps, t0, t1, slots),
            "free_slot_share": idle["free_slot_share"], "steps": idle["steps"],
            "pulled_to_first_token_ms": {
                "p50": _ms(pct(held, 50)), "p99": _ms(pct(held, 99)),
                "max": _ms(max(held) if held else None)},
            "last_finish_s": max((r["finished"] for r in mine), default=t0) - t0,
        }
    return out


def fleet_summary(workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fleet-wide figures from the per-worker ones: the worst split and the mean occupancy."""
    shares = [w["jobs_share"] or 0.0 for w in workers.values()]
    tok = [w["output_tokens_share"] or 0.0 for w in workers.values()]
    occ = [w["mean_occupancy"] for w in workers.values() if w["mean_occupancy"] is not None]
    idle = [w["free_slot_share"] for w in workers.values() if w["free_slot_share"] is not None]
    finish = [w["last_finish_s"] for w in workers.values()]
    return {"jobs_share_spread": max(shares) - min(shares) if shares else None,
            "output_tokens_share_spread": max(tok) - min(tok) if tok else None,
            "mean_occupancy": sum(occ) / len(occ) if occ else None,
            "free_slot_share_max": max(idle) if idle else None,
            "last_finish_spread_s": max(finish) - min(finish) if finish else None}


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def add_fleet_figures(summary: dict[str, Any], raw: dict[str, Any], cfg: BenchConfig) -> None:
    """Per-worker figures into a fleet mode's summary; its occupancy and free-slot figures
    become the workers' mean and worst (one engine's step log cannot speak for the fleet)."""
    wl = cfg.workload
    workers = per_worker(raw, cfg.engine.max_num_seqs, wl.long_prompt_tokens if wl.long_share
                         else 0)
    fleet = fleet_summary(workers)
    summary.update(workers=workers, fleet=fleet, admission=FLEET_MODES.get(raw.get("mode", "")),
                   mean_occupancy=fleet["mean_occupancy"],
                   engine_steps=sum(w["steps"] for w in workers.values()))
    summary["slot_idle"] = {"free_slot_share": fleet["free_slot_share_max"]}
