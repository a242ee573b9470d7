"""CPU seconds spent by each process group of a mode over its measured window.

On a small CPU box the engine's two busy processes share the cores with everything else, so
CPU spent outside the engine (the frontend's Python, Redis, the submitting client) slows the
engine's steps: these figures say where it went.
"""

from __future__ import annotations

from typing import Any


def _proc(pid: int) -> Any:
    import psutil  # type: ignore[import-untyped]

    return psutil.Process(pid)


def groups(frontend_pid: int, redis_pid: int | None = None,
           client_pid: int | None = None) -> dict[str, list[Any]]:
    """frontend = the process that owns the engine client; engine = its descendants."""
    front = _proc(frontend_pid)
    out: dict[str, list[Any]] = {"frontend": [front],
                                 "engine": front.children(recursive=True)}
    if redis_pid:
        out["redis"] = [_proc(redis_pid)]
    if client_pid:
        out["client"] = [_proc(client_pid)]
    return out


def snapshot(g: dict[str, list[Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, procs in g.items():
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # gone: counts what it had at the last snapshot only
                continue
        out[name] = total
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - v, 3) for k, v in before.items()}
