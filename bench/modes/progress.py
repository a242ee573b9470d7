"""Progress of a mode that runs in another process: ``done total`` in a file the parent
polls (written atomically)."""

from __future__ import annotations

from pathlib import Path


def progress_file(run_dir: Path, mode: str) -> Path:
    return run_dir / f"{mode}.progress"


def write_progress(run_dir: Path, mode: str, done: int, total: int) -> None:
    tmp = run_dir / f"{mode}.progress.tmp"
    tmp.write_text(f"{done} {total}")
    tmp.replace(progress_file(run_dir, mode))


def read_progress(run_dir: Path, mode: str) -> tuple[int, int] | None:
    path = progress_file(run_dir, mode)
    try:
        done, total = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return done, total
