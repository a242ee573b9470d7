"""The engine interface the feeder drives, and per-step engine statistics.

``VllmEngine`` (worker/engines/vllm.py) wraps vLLM's ``AsyncLLM``; ``SimEngine``
(worker/engines/sim.py) models batch steps without a model, for fault tests and soaks. Both
satisfy :class:`Engine`, so the feeder cannot tell them apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from producer.schema import JobRequest


@dataclass
class Generation:
    """What one request produced."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None = None
    aborted: bool = False
    logprobs: list[dict[str, Any]] | None = None
    """Per generated token (worker/engines/logprobs.py's shape) when the request asked for them."""


STEP_WEIGHT = 0.05
STEP_GAP_MAX_S = 5.0
"""A longer gap between two steps is an idle engine, not a step time."""


@dataclass
class StepStats:
    """Engine state, updated every step by the engine's stat logger."""

    steps: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    last_step_at: float = field(default_factory=time.monotonic)
    full_steps: int = 0
    """Steps with every slot busy."""
    starved_steps: int = 0
    """Steps with a free slot, nothing waiting inside the engine to take it, and jobs
    waiting in Redis (as the feeder last saw it): the idle time slotfill is to blame for."""
    backlog: bool = False
    """Set by the feeder: its last read filled every free place, so more jobs wait."""
    held: int = 0
    """Set by the feeder: jobs it holds (in the engine, or being read/published)."""
    reading: bool = False
    """Set by the feeder while a read of new jobs is on its way to Redis: a step with a free
    slot then is Redis latency (or a starved CPU), not a feeder that forgot to pull."""
    step_s: float = 0.0
    """Smoothed time between steps while requests run (0 until measured)."""
    log: IO[str] | None = None
    on_step: Callable[[], None] | None = None
    """Set by the feeder: called after each step, so admission that depends on the engine's
    state (not only on finished jobs) is re-evaluated at once. Must not block."""

    def record(self, running: int, waiting: int, kv: float, slots: int) -> None:
        now = time.monotonic()
        if self.running and now - self.last_step_at < STEP_GAP_MAX_S:
            gap = now - self.last_step_at
            self.step_s = gap if not self.step_s else self.step_s + STEP_WEIGHT * (gap - self.step_s)
        self.steps += 1
        self.running, self.waiting, self.kv_cache_usage = running, waiting, kv
        self.last_step_at = now
        if running >= slots:
            self.full_steps += 1
        elif waiting == 0 and self.backlog:
            self.starved_steps += 1
        if self.log is not None:
            self.log.write(json.dumps({"t": time.time(), "running": running, "waiting": waiting,
                                       "kv": round(kv, 4), "backlog": self.backlog,
                                       "held": self.held, "reading": self.reading}) + "\n")
        if self.on_step is not None:
            self.on_step()


DeltaSink = Callable[[str, list[int]], None]
"""Receives a streaming request's new text and token ids as the engine produces them."""


class Engine(Protocol):
    max_model_len: int
    slots: int
    stats: StepStats

    async def generate(self, job_id: str, request: JobRequest,
                       on_delta: DeltaSink | None = None) -> Generation:
        """Run one request to completion (or abort). Raises InvalidRequest for bad input
        (the job alone fails) and EngineDead when the engine is gone. With ``on_delta``,
        new output is also handed over step by step as it is generated."""
        ...

    async def abort(self, job_id: str) -> None: ...

    def close(self) -> None: ...
