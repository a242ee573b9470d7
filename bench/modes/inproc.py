"""The engine-only modes (offline, asyncio), each in a fresh Python process: one engine at a
time and a clean shutdown. Parent side: :func:`run_inproc`; child side:
``python -m bench.modes.inproc MODE RUN_DIR``, which writes ``RUN_DIR/MODE.json`` (timings
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


def run_inproc(mode: str, run_dir: Path, progress: Callable[[str, int, int], None],
               total: int) -> dict[str, Any]:
    """Run ``mode`` in a child process and return its raw result."""
    log = run_dir / f"{mode}.log"
    progress("starting engine", 0, total)
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "bench.modes.inproc", mode, str(run_dir)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True)
    try:
        while proc.poll() is None:
            got = read_progress(run_dir, mode)
            if got is not None:
                progress("running", *got)
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, 9)  # engine processes left behind, if any
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{mode} exited with {proc.returncode}; log {log}:\n{tail}")
    data: dict[str, Any] = json.loads((run_dir / f"{mode}.json").read_text())
    return data


def main(argv: list[str]) -> int:
    mode, run_dir = argv[0], Path(argv[1])
    cfg = BenchConfig.load(run_dir / "config.json")
    reqs = make_workload(cfg.workload, cfg.workload.vocab_size or model_vocab_size(cfg.model_path),
                         cfg.model_path)
    if mode == "offline":
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
