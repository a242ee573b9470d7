"""``python -m bench latency``: the live-load command's options (bench/latency.py runs it).

    python -m bench latency                                    # CPU defaults, every system
    python -m bench latency --systems serve,slotfill --seconds 15 --loads 50,100,120
    python -m bench latency --capacity 12.5 --burst 0          # given capacity, no burst
    python -m bench latency --interleave     # all systems up, level by level (shared box)
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from bench import cli_options as opt


def latency(
    ctx: typer.Context,
    model: opt.Model = "",
    load_format: opt.LoadFormat = "dummy",
    skip_tokenizer_init: opt.SkipTokenizerInit = False,
    max_num_seqs: opt.MaxNumSeqs = 32,
    max_num_batched_tokens: opt.MaxNumBatchedTokens = 2048,
    max_model_len: opt.MaxModelLen = 512,
    gpu_memory_utilization: opt.GpuMemoryUtilization = 0.9,
    enforce_eager: opt.EnforceEager = False,
    headroom: opt.Headroom = 8,
    prompt_tokens: Annotated[int, typer.Option()] = 64,
    min_prompt_tokens: Annotated[int, typer.Option(help="0 = fixed prompt length")] = 0,
    min_output: Annotated[int, typer.Option()] = 16,
    max_output: Annotated[int, typer.Option()] = 128,
    seed: Annotated[int, typer.Option(help="request mix and arrivals")] = 0,
    loads: Annotated[str, typer.Option(help="offered loads, % of capacity")] = (
        "25,50,75,90,100,120"),
    seconds: Annotated[float, typer.Option(help="arrivals per level, seconds")] = 20.0,
    burst: Annotated[str, typer.Option(help="PERCENT:SECONDS of the burst after the levels "
                                       "(0 = none)")] = "200:10",
    systems: Annotated[str, typer.Option(help="serve,slotfill,gateway")] = (
        "serve,slotfill,gateway"),
    capacity: Annotated[float, typer.Option(help="req/s the loads refer to; 0 = measure "
                                            "(offline mode)")] = 0.0,
    capacity_requests: Annotated[int, typer.Option(help="requests of the offline "
                                                   "capacity run")] = 200,
    warmup: Annotated[int, typer.Option(help="unmeasured requests per system first")] = 16,
    drain_timeout: Annotated[float, typer.Option(help="seconds after a level's last "
                                                 "arrival before the rest count lost")] = 180.0,
    interleave: Annotated[bool, typer.Option(
        help="every system up at once, levels run level by level against each in turn "
             "(a shared box's load drift falls on all alike; needs memory for every "
             "engine)")] = False,
    redis_boost: Annotated[bool, typer.Option()] = True,
    results_dir: Annotated[Path, typer.Option(help="raw samples go to RESULTS_DIR/raw/")] = (
        Path("bench/results")),
    out: Annotated[str, typer.Option(help="prefix of PREFIX.json/.md/.png (default: "
                                     "RESULTS_DIR/latency-DATE)")] = "",
) -> None:
    """Latency vs offered load (open-loop arrivals): vllm serve, slotfill, its gateway."""
    from rich.console import Console

    from bench.config import BenchConfig, WorkloadConfig
    from bench.latency import LiveConfig, run_live
    from bench.latency_report import SYSTEMS, markdown_table

    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    if bad := [s for s in chosen if s not in SYSTEMS]:
        raise typer.BadParameter(f"unknown systems {bad}; choose from {', '.join(SYSTEMS)}")
    if skip_tokenizer_init and "gateway" in chosen:
        chosen.remove("gateway")  # its chunks are text: no tokens to time without a tokenizer
    if prompt_tokens + max_output > max_model_len:
        raise typer.BadParameter("prompt tokens + max_output exceeds max_model_len")
    b_pct, _, b_s = burst.partition(":")
    cfg = BenchConfig(
        engine=opt.engine_config(ctx.params),
        workload=WorkloadConfig(prompt_tokens=prompt_tokens,
                                min_prompt_tokens=min_prompt_tokens, min_output=min_output,
                                max_output=max_output, seed=seed), modes=[])
    live = LiveConfig(fractions=[float(x) / 100 for x in loads.split(",") if x.strip()],
                      seconds=seconds, burst_fraction=float(b_pct) / 100,
                      burst_seconds=float(b_s or 10), systems=chosen, capacity=capacity,
                      capacity_requests=capacity_requests, warmup=warmup,
                      drain_timeout=drain_timeout, seed=seed, interleave=interleave)
    # A SIGTERM (``timeout`` in the GPU stage) unwinds like Ctrl-C: the servers, the worker
    # and the private Redis are stopped by their context managers, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console()
    argv = sys.argv[sys.argv.index("latency") + 1:] if "latency" in sys.argv else []
    results = run_live(cfg, live, results_dir, out or None, argv,
                       lambda m: console.print(m, markup=False, highlight=False),
                       redis_boost=redis_boost)
    console.print(markdown_table(results), markup=False, highlight=False)
