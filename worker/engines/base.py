"""The engine interface the feeder drives, and per-step engine statistics.

``VllmEngine`` (worker/engines/vllm.py) wraps vLLM's ``AsyncLLM``; ``SimEngine``
(worker/engines/sim.py) models batch steps without a model, for fault tests and soaks. Both
satisfy :class:`Engine`, so the feeder cannot tell them apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

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


@dataclass(frozen=True)
class Step:
    """One engine step, as the engine's scheduler saw it."""

    at: float
    """``time.monotonic()`` when it was recorded."""
    running: int
    waiting: int
    kv_cache_usage: float
    slots: int
    tokens: int = 0
    """Tokens the engine generated in this step (all requests)."""

    @property
    def full(self) -> bool:
        return self.running >= self.slots


StepListener = Callable[[Step], None]
"""Called with every step (the admission wake-up, the step log). Must not block."""


class StepStats:
    """The engine's per-step record. Only its engine writes it (:meth:`record`, once per
    step); everyone else reads it, or subscribes to each step. It knows nothing of the
    feeder and does no I/O: a step log is a subscriber the runner attaches."""

    def __init__(self) -> None:
        self._last = Step(time.monotonic(), 0, 0, 0.0, 0)
        self._steps = 0
        self._full_steps = 0
        self._step_s = 0.0
        self._tokens = 0
        self._listeners: list[StepListener] = []

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def tokens(self) -> int:
        """Tokens generated since start (what the engine did, wasted work included)."""
        return self._tokens

    @property
    def full_steps(self) -> int:
        """Steps with every slot busy."""
        return self._full_steps

    @property
    def running(self) -> int:
        return self._last.running

    @property
    def waiting(self) -> int:
        return self._last.waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._last.kv_cache_usage

    @property
    def last_step_at(self) -> float:
        """``time.monotonic()`` of the last step (of creation, before any)."""
        return self._last.at

    @property
    def step_s(self) -> float:
        """Smoothed time between steps while requests run (0 until measured)."""
        return self._step_s

    def subscribe(self, listener: StepListener) -> None:
        self._listeners.append(listener)

    def record(self, running: int, waiting: int, kv: float, slots: int,
               tokens: int = 0) -> None:
        """The engine's scheduler finished a step (called by the engine only)."""
        now = time.monotonic()
        prev = self._last
        if prev.running and now - prev.at < STEP_GAP_MAX_S:
            gap = now - prev.at
            self._step_s = gap if not self._step_s else self._step_s + STEP_WEIGHT * (gap - self._step_s)
        step = Step(now, running, waiting, kv, slots, tokens)
        self._steps += 1
        self._tokens += tokens
        self._full_steps += step.full
        self._last = step
        for listener in self._listeners:
            listener(step)


DeltaSink = Callable[[str, list[int]], None]
"""Receives a streaming request's new text and token ids as the engine produces them."""


class Engine(Protocol):
    max_model_len: int
    slots: int
    stats: StepStats
    eos_token_ids: frozenset[int]
    """The model's end-of-sequence ids (a resumed job whose checkpoint ends with one had
    finished: worker/resume.py)."""

    async def generate(self, job_id: str, request: JobRequest,
                       on_delta: DeltaSink | None = None,
                       resume_ids: list[int] | None = None) -> Generation:
        """Run one request to completion (or abort). Raises InvalidRequest for bad input
        (the job alone fails) and EngineDead when the engine is gone. With ``on_delta``,
        new output is also handed over step by step as it is generated.

        ``resume_ids``: tokens an earlier attempt generated. They follow the prompt's ids as
        the engine's prompt (ids, never re-tokenized), and generation continues after them;
        the request's ``max_tokens`` / ``min_tokens`` already count only what is left. The
        ``Generation`` then holds the new tokens only, with the request's own prompt size."""
        ...

    async def prompt_tokens(self, request: JobRequest) -> int:
        """How many tokens the request's prompt is (a resumed job with nothing left to do)."""
        ...

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of generated ids (an earlier attempt's, for the result)."""
        ...

    async def abort(self, job_id: str) -> None: ...

    def close(self) -> None: ...
