"""Where and how fast the tests' real engines boot: each engine worker held on one core of
its own, and the boots in the background at a low priority until a test uses them
(tests/conftest.py starts the engines; README, Tests)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from slotfill.testing.fleet import WorkerProcess


def engine_core(i: int) -> int:
    """The CPU that the session's ``i``-th engine is held on: engines that run at the same
    time get different cores (``slotfill.testing.fleet.pin_engine_env`` says why)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores[i % len(cores)]


_backgrounded: list[WorkerProcess] = []

BACKGROUND_NICE = 10
LAST_NICE = 19
"""The kill test's pair and the bench's smoke run, needed only at the end: they boot on what
the shared engines' boots leave (a run where all booted at nice 10 made the first engine
test wait 95 s for the feature engine), then at ``BACKGROUND_NICE`` once the first of those is
ready (left at 19, the kill test waited 26 s for its pair)."""
late: list[int] = []
"""Process ids whose autogroups are at ``LAST_NICE``."""


def set_autogroup_nice(pid: int, nice: int) -> None:
    with contextlib.suppress(OSError):  # no autogroups, or not permitted: default priority
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def promote_late() -> None:
    """Once the first shared engine is ready, what boots for the last tests gets their share."""
    while late:
        set_autogroup_nice(late.pop(), BACKGROUND_NICE)


def in_background(w: WorkerProcess, nice: int = BACKGROUND_NICE) -> WorkerProcess:
    """Lower the autogroup of ``w``'s session (a session of its own, which the engine
    processes it starts share; kernel.sched_autogroup_enabled=1) to ``nice`` until a test
    uses it: its boot then takes the CPU that the tests before it leave idle, and a
    test that needs the CPU (timed steps, leases) gets it first."""
    assert w.proc is not None
    set_autogroup_nice(w.proc.pid, nice)
    if nice == LAST_NICE:
        late.append(w.proc.pid)
    _backgrounded.append(w)
    return w


def foreground(*used: WorkerProcess) -> None:
    """A worker started in the background runs at the default priority once a test uses it
    (as in production: measured on this shared box, a worker left at nice 10 beside other
    sessions' engines stalled past its 10 s lease); the others boot on at theirs."""
    for w in used:
        if w not in _backgrounded:
            continue
        _backgrounded.remove(w)
        if w.proc is not None and w.proc.poll() is None:
            set_autogroup_nice(w.proc.pid, 0)
            with contextlib.suppress(ValueError):
                late.remove(w.proc.pid)


BENCH_CORE = 1
"""``engine_core`` of the bench's smoke run (its engines run one after the other)."""


def low_priority() -> None:
    # A session of its own (so its autogroup, kernel.sched_autogroup_enabled=1) at LAST_NICE
    # (then BACKGROUND_NICE: promote_late), and BACKGROUND_NICE inside it: the background run
    # takes the CPU the tests leave idle, and a test that needs the CPU (timed steps, leases)
    # gets it first. Its engines stay on one core (pin_engine_env).
    os.sched_setaffinity(0, {engine_core(BENCH_CORE)})
    os.setsid()
    set_autogroup_nice(os.getpid(), LAST_NICE)
    os.nice(BACKGROUND_NICE)
