"""``python -m bench``: the benchmark's command line (imports stay light until a run starts).

    python -m bench                       # every mode, CPU defaults (tiny model), + soak
    python -m bench --modes offline,slotfill --requests 200
    python -m bench --modes fleet,fleet_fixed --workers 2   # admission policies, 2 workers
    python -m bench --modes slotfill,stream@0,stream@50     # what token streaming costs
    python -m bench soak --jobs 100000    # the soak alone
    python -m bench report a.json b.json  # merge runs (e.g. GPU modes run in several calls)
    python -m bench latency               # latency vs offered load, next to vllm serve
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bench import cli_options as opt
from bench.latency_cli import latency

app = typer.Typer(help="Benchmark slotfill against the engine's own limit, an in-process "
                       "feeder and Celery.", add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
console = Console()


@app.callback(invoke_without_command=True)
def run(
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
    requests: Annotated[int, typer.Option(help="requests in the workload")] = 1000,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length (max if "
                                               "--min-prompt-tokens is set)")] = 64,
    min_prompt_tokens: Annotated[int, typer.Option(help="0 = fixed prompt length")] = 0,
    long_share: Annotated[float, typer.Option(help="share of requests with a long prompt "
                                              "(--long-prompt-tokens) instead")] = 0.0,
    long_prompt_tokens: Annotated[int, typer.Option(help="length of the long prompts")] = 0,
    min_output: Annotated[int, typer.Option(help="output tokens, uniform from")] = 16,
    max_output: Annotated[int, typer.Option(help="output tokens, uniform to")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    modes: Annotated[str, typer.Option(
        help="comma-separated: offline,slotfill,asyncio,celery_batch,celery_per_request; "
             "also fleet,fleet_fixed,fleet_adaptive (--workers workers on one queue; "
             "engine-aware, fixed and adaptive "
             "admission), stream@<ms> (every job streams, coalesced every <ms> ms)")] = (
        "offline,slotfill,asyncio,celery_batch,celery_per_request"),
    workers: Annotated[int, typer.Option(help="worker processes of the fleet modes")] = 2,
    gpus: Annotated[str, typer.Option(help="fleet modes: one worker per listed GPU, each "
                                      "seeing only its own (CUDA_VISIBLE_DEVICES), e.g. 0,1 "
                                      "(0+1,2+3: two GPUs each); overrides --workers and "
                                      "adds scaling = fleet / (workers x offline)")] = "",
    text: Annotated[bool, typer.Option(help="text prompts cut from the model directory's "
                                       "corpus.txt.gz, detokenized output (needs the "
                                       "tokenizer: bench/gpu/make_text_model.py)")] = False,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs each engine spans (every "
                                                      "mode's engine)")] = 1,
    executor: Annotated[str, typer.Option(help="vLLM distributed_executor_backend; default: "
                                          "mp with tensor parallelism, else vLLM's")] = "",
    engine: Annotated[str, typer.Option(help="workers' engine: vllm, or sim (the "
                                        "step-simulating engine; worker modes only)")] = (
        os.environ.get("SLOTFILL_ENGINE", "vllm")),
    sim_step_ms: Annotated[float, typer.Option(help="step time of --engine sim")] = 5.0,
    sim_output_us: Annotated[float, typer.Option(
        help="--engine sim: event-loop time per running request per step (vLLM's output "
             "processing in the worker's process)")] = 0.0,
    admission: Annotated[str, typer.Option(help="slotfill/stream workers' admission rule: "
                                           "adaptive, fixed or engine; default: the "
                                           "worker's. Several (comma-separated): one run "
                                           "each")] = "",
    checkpoint_interval_ms: Annotated[float, typer.Option(
        help="workers' checkpoint interval (0 = checkpoints off: the cost of intermediate "
             "engine outputs for every job); default: the worker's")] = -1.0,
    checkpoint_outputs: Annotated[bool, typer.Option(
        help="workers take checkpoints from intermediate engine outputs (the worker's "
             "checkpoint_peek off): what those outputs cost")] = False,
    sizes: Annotated[str, typer.Option(help="batch-size sweep: SLOTS[:SIM_STEP_MS],... e.g. "
                                       "256:13,512:23,1024:40; one run per size (and "
                                       "admission rule), then a table by size")] = "",
    celery_requests: Annotated[int, typer.Option(
        help="requests for the (slow) celery per-request mode")] = 64,
    celery_batch: Annotated[int, typer.Option(
        help="requests per task in celery batch mode; 0 = max_num_seqs")] = 0,
    repeat: Annotated[int, typer.Option(help="run the modes this many times (interleaved) "
                                        "and report each mode's median-throughput run")] = 1,
    submit: Annotated[bool, typer.Option(help="measure submit jobs/s and Redis "
                                         "commands/job")] = True,
    submit_jobs: Annotated[int, typer.Option(help="jobs for submit_many jobs/s (one by one: a "
                                             "tenth)")] = 20_000,
    submit_depth: Annotated[int, typer.Option(help="queue depth of the second commands/job "
                                              "probe")] = 100_000,
    soak_jobs: Annotated[int, typer.Option(help="jobs of the sim-engine soak at the end "
                                           "(0 = none)")] = 100_000,
    redis_boost: Annotated[bool, typer.Option(
        help="give the private redis-server its own session with autogroup nice -10 (see "
             "bench/redis_server.py); --no-redis-boost = RedisServer's plain renice")] = True,
    results_dir: Annotated[Path, typer.Option(help="summaries and plots go here; logs, step "
                                              "logs and series to RESULTS_DIR/raw/")] = (
        Path("bench/results")),
    out: Annotated[str, typer.Option(help="output path prefix (default: "
                                     "RESULTS_DIR/cpu|gpu-DATE)")] = "",
) -> None:
    """Run every chosen mode on one seeded workload with one engine configuration."""
    if ctx.invoked_subcommand is not None:
        return
    from bench.config import (
        ALL_MODES,
        WORKER_MODES,
        BenchConfig,
        WorkloadConfig,
        is_worker_mode,
        stream_interval,
    )
    from bench.report import print_report
    from bench.runner import Runner

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in chosen if m not in ALL_MODES and stream_interval(m) is None]
    if bad:
        raise typer.BadParameter(f"unknown modes {bad}; choose from {', '.join(ALL_MODES)}")
    cfg = BenchConfig(
        engine=opt.engine_config(ctx.params, engine=engine, sim_step_ms=sim_step_ms,
                                 sim_output_us=sim_output_us, admission=admission,
                                 tensor_parallel_size=tensor_parallel_size,
                                 executor=executor,
                                 checkpoint_interval_ms=checkpoint_interval_ms,
                                 checkpoint_outputs=checkpoint_outputs),
        workload=WorkloadConfig(requests=requests, prompt_tokens=prompt_tokens,
                                min_prompt_tokens=min_prompt_tokens, min_output=min_output,
                                max_output=max_output, seed=seed, long_share=long_share,
                                long_prompt_tokens=long_prompt_tokens, text=text),
        modes=[m for m in ALL_MODES if m in chosen]
        + [m for m in chosen if stream_interval(m) is not None],
        celery_requests=celery_requests, celery_batch=celery_batch, workers=workers,
        gpus=[g.strip() for g in gpus.split(",") if g.strip()])
    if text and skip_tokenizer_init:
        raise typer.BadParameter("--text needs the tokenizer: drop --skip-tokenizer-init")
    longest = max(prompt_tokens, long_prompt_tokens if long_share else 0)
    if longest + cfg.workload.max_output > max_model_len:
        raise typer.BadParameter("prompt tokens + max_output exceeds max_model_len")
    if engine not in ("vllm", "sim"):
        raise typer.BadParameter("--engine is vllm or sim")
    if engine == "sim" and not all(is_worker_mode(m) for m in cfg.modes):
        raise typer.BadParameter(f"--engine sim runs only the modes {', '.join(WORKER_MODES)}")
    argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else sys.argv[1:]
    rules = [a.strip() for a in admission.split(",")]
    if sizes or len(rules) > 1:
        from bench.sweep import parse_sizes, run_sweep

        grid = parse_sizes(sizes) or [(max_num_seqs, None)]
        run_sweep(cfg, grid, rules, console, results_dir, out or None, argv, redis_boost, repeat)
        return
    submit_sizes = {"single": max(1, submit_jobs // 10), "many": submit_jobs,
                    "depth": submit_depth, "probe": max(1, min(5000, submit_jobs // 4))}
    results = Runner(cfg, console, results_dir, redis_boost=redis_boost, repeat=repeat).run(
        argv, submit=submit_sizes if submit else None, soak_jobs=soak_jobs,
        out_prefix=out or None)
    print_report(results, console)
    failed = [m for m, r in results["modes"].items() if "error" in r]
    if failed:
        console.print(f"[red]failed modes: {', '.join(failed)}[/red]")
        raise typer.Exit(1)


@app.command()
def soak(
    jobs: Annotated[int, typer.Option(help="jobs to push through one sim-engine worker")] = 100_000,
    slots: Annotated[int, typer.Option(help="sim engine slots")] = 256,
    step_ms: Annotated[float, typer.Option(help="sim engine step time")] = 2.0,
    out: Annotated[str, typer.Option(help="JSON file to write (default: print only)")] = "",
) -> None:
    """Worker memory over a long run on the step-simulating engine (RSS start/end)."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from bench.modes.soak import run_soak

    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("soak", total=jobs)
        res = run_soak(jobs, slots=slots, step_ms=step_ms,
                       progress=lambda p, d, t: bar.update(task, description=p, completed=d))
    shown = {k: v for k, v in res.items() if k != "rss_samples"}
    console.print_json(json.dumps(shown))
    if out:
        from bench import report

        prefix = Path(out)
        report.write_results({"soak": res, "files": report.files_for(prefix, prefix.parent)})


@app.command(name="report")
def report_cmd(
    files: Annotated[list[Path], typer.Argument(help="bench JSON files; later ones' modes "
                                                "override earlier ones'")],
    out: Annotated[str, typer.Option(help="write the merged JSON/PNG with this prefix")] = "",
    results_dir: Annotated[Path, typer.Option(help="its series go to RESULTS_DIR/raw/")] = (
        Path("bench/results")),
) -> None:
    """Print (and optionally merge) bench results, e.g. modes run in separate calls."""
    from bench import report

    merged: dict[str, Any] = {}
    for f in files:
        data = report.load_results(f)
        if merged and any(merged.get("config", {}).get(k) != data.get("config", {}).get(k)
                          for k in ("engine", "workload")):
            console.print(f"[yellow]warning:[/yellow] {f} ran another engine configuration "
                          "or workload than the files before it: ratios compare unlike runs")
        modes = {**merged.get("modes", {}), **data.get("modes", {})}
        merged = {**merged, **{k: v for k, v in data.items() if v}, "modes": modes}
    from bench.config import ALL_MODES

    order = {m: i for i, m in enumerate(ALL_MODES)}
    merged["modes"] = dict(sorted(merged.get("modes", {}).items(),
                                  key=lambda kv: order.get(kv[0], len(order))))
    report.add_ratios(merged)
    merged["targets"] = report.targets(merged)
    if out:
        prefix = Path(out)
        merged["files"] = report.files_for(prefix, results_dir)
        report.write_results(merged)
    report.print_report(merged, console)


app.command(name="latency")(latency)


def main(args: list[str] | None = None) -> None:
    app(args=args, prog_name="python -m bench")


if __name__ == "__main__":
    main()
