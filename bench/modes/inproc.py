"""The engine-only modes (offline, asyncio), each in a fresh Python process: one engine at a
time and a clean shutdown. Parent side: :func:`run_inproc` (and :func:`run_inproc_split`); child side:
``python -m bench.modes.inproc MODE RUN_DIR [SHARE COUNT]``, which writes ``RUN_DIR/MODE.json`` (timings
per request), ``RUN_DIR/MODE.steps.jsonl`` (one line per engine step) and the progress file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import REPO_ROOT, BenchConfig, model_vocab_size
from bench.modes.progress import read_progress
from bench.workload import make_workload

INPROC_MODES = ("offline", "asyncio")
SPLIT = "offline_split"


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    """``python -m bench.modes.inproc ARGS`` in a session of its own, output to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "bench.modes.inproc", *args],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child if it still runs, and the engine processes it left behind, if any."""
    if proc.poll() is None:
        proc.kill()
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def run_inproc(mode: str, run_dir: Path, progress: Callable[[str, int, int], None],
               total: int) -> dict[str, Any]:
    """Run ``mode`` in a child process and return its raw result."""
    log = run_dir / f"{mode}.log"
    progress("starting engine", 0, total)
    proc = _spawn([mode, str(run_dir)], log)
    try:
        while proc.poll() is None:
            got = read_progress(run_dir, mode)
            if got is not None:
                progress("running", *got)
            time.sleep(0.25)
    finally:
        _reap(proc)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{mode} exited with {proc.returncode}; log {log}:\n{tail}")
    data: dict[str, Any] = json.loads((run_dir / f"{mode}.json").read_text())
    return data


def split_name(share: int) -> str:
    return f"{SPLIT}.{share}"


def run_inproc_split(run_dir: Path, gpus: list[str],
                     progress: Callable[[str, int, int], None], total: int) -> dict[str, Any]:
    """``offline_split``: one offline child per GPU at once, share i = requests i, i+k, ...;
    the merged wall is the longest share's (each share timed from its own start)."""
    k = len(gpus)
    progress("starting engines", 0, total)
    procs = [_spawn(["offline", str(run_dir), str(i), str(k)],
                    run_dir / f"{split_name(i)}.log",
                    {**os.environ, "CUDA_VISIBLE_DEVICES": gpu.replace("+", ",")})
             for i, gpu in enumerate(gpus)]
    try:
        while any(p.poll() is None for p in procs):
            got = [read_progress(run_dir, split_name(i)) for i in range(k)]
            progress("running", sum(g[0] for g in got if g), total)
            time.sleep(0.25)
    finally:
        for p in procs:
            _reap(p)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{SPLIT}: share(s) {failed} failed; logs in {run_dir}")
    parts = [json.loads((run_dir / f"{split_name(i)}.json").read_text()) for i in range(k)]
    # The engines load side by side but not in lockstep: each share's clock starts at its
    # own generate() call, so a share that loaded later is not charged with the other's head
    # start (the wall is the longest share's).
    first = min(parts, key=lambda p: p["t_start"])
    t0 = first["t_start"]
    for p in parts:
        _shift(p, p["t_start"] - t0)
    return {"t_start": t0, "t_end": max(p["t_end"] for p in parts),
            "startup_s": max(p["startup_s"] for p in parts),
            "records": [r for p in parts for r in p["records"]],
            # Step figures (occupancy, free-slot steps): the engine that started first (its
            # clock is the one not shifted).
            "steps_file": first["steps_file"],
            "extra": {"cpu_s": {k: round(sum(p["extra"]["cpu_s"].get(k, 0.0) for p in parts), 3)
                                for k in parts[0]["extra"]["cpu_s"]},
                      "shares": [{"gpu": g, "requests": len(p["records"]),
                                  "wall_s": p["t_end"] - p["t_start"]}
                                 for g, p in zip(gpus, parts, strict=True)]}}


def _shift(part: dict[str, Any], by: float) -> None:
    """Move one share's timestamps ``by`` seconds earlier."""
    part["t_start"] -= by
    part["t_end"] -= by
    for rec in part["records"]:
        for key in ("submitted", "started", "scheduled", "first_token", "finished"):
            if rec.get(key) is not None:
                rec[key] -= by


def main(argv: list[str]) -> int:
    mode, run_dir = argv[0], Path(argv[1])
    cfg = BenchConfig.load(run_dir / "config.json")
    reqs = make_workload(cfg.workload, cfg.workload.vocab_size or model_vocab_size(cfg.model_path),
                         cfg.model_path)
    if mode == "offline" and len(argv) == 4:  # one share of offline_split
        from bench.modes.offline import run_offline

        share, k = int(argv[2]), int(argv[3])
        mode = split_name(share)
        result = run_offline(cfg, reqs[share::k], run_dir, mode)
    elif mode == "offline":
        from bench.modes.offline import run_offline

        result = run_offline(cfg, reqs, run_dir)
    elif mode == "asyncio":
        from bench.modes.asyncio_feeder import run_asyncio

        result = asyncio.run(run_asyncio(cfg, reqs, run_dir))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["mode"] = mode
    result["steps_file"] = str(run_dir / f"{mode}.steps.jsonl")
    (run_dir / f"{mode}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
