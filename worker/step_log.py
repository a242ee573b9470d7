"""The step log (``step_log`` setting): one JSON line per engine step, with what the pull
loop was doing at that moment. A subscriber to the engine's steps, attached by the runner;
the engine's stats know nothing of it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from worker.engines.base import Step
from worker.state import FeederState


class StepLog:
    def __init__(self, path: str | Path, state: FeederState, held: Callable[[], int]) -> None:
        # Opened once at start-up, before any job runs; line-buffered writes are cheap.
        self._file = open(path, "a", buffering=1)  # noqa: SIM115
        self._state = state
        self._held = held

    def __call__(self, step: Step) -> None:
        st = self._state
        self._file.write(json.dumps({
            "t": time.time(), "running": step.running, "waiting": step.waiting,
            "kv": round(step.kv_cache_usage, 4), "tokens": step.tokens,
            "backlog": st.backlog, "held": self._held(), "reading": st.reading}) + "\n")

    def close(self) -> None:
        self._file.close()
