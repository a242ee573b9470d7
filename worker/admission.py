"""How many jobs the pull loop reads.

The default rule (``admission = "adaptive"``) holds the engine's slots plus a ready queue
sized by what the engine finishes: jobs inside the engine beyond its slots refill a slot in
the next step without a Redis round trip, so the queue must cover the jobs that finish
between a slot freeing and its replacement arriving. Finishes come per engine step, about
``slots / mean output length`` of them, so a count that suits 32 slots starves 1,024 (there
~4 jobs finish per 40 ms step and the fixed 8 of ``headroom`` ran out on 4.7 % of an H200's
steps). The queue is the Poisson upper quantile (miss chance ``READY_MISS``) of the jobs
finishing over one refill window (two engine steps plus a read's round trip, plus the
worst recent delay between a job leaving the engine and the read that replaces it being
sent: the event loop busy with engine outputs, result writes, garbage collection), from the
measured finish rate, step time and delays, never less than ``headroom`` (the fixed rule, which it
thus never undercuts); plus the jobs that finish in one engine step (upper quantile, miss
chance ``AHEAD_MISS``), read *ahead*: so the replacement of a job is already held when it
finishes, and a Redis round trip after a finish never stands between the ready queue and
its level (at 256 slots on an H200 ~1 job finishes per 13 ms step and the quantile is 4;
without it every refill was a whole re-read after the finish, p99 3.4 ms); never more than
the slots (``headroom = 0``: none, as for every rule);
grown by one per measuring window in
which the engine still ran a step with a free slot while jobs waited in Redis (shrunk back
after ``CALM_WINDOWS`` calm windows). Each read takes what is missing to that level: what
finished since the last read.

``admission = "engine"`` (for fleets of workers on one queue) holds no more than it needs,
so jobs wait in Redis where any peer can take them. A worker that reads more than its
engine can start soon *hoards*: the extra jobs sit in its pending list, unstarted, while a
peer with free slots could have run them. A worker that reads too little leaves slots idle
while a refill crosses Redis. The rule, re-evaluated on every finished job and every engine
step (vLLM's stat logger, :class:`StepStats`):

* **Fill the free slots.** ``slots - running`` jobs (minus held jobs not yet running, which
  take those slots first) are always read: occupancy never waits on admission.
* **Keep a small ready queue.** Beyond the slots, hold jobs ready so a slot that frees is
  refilled within the same engine step rather than after a round trip to Redis: as many as
  finish while a refill is on its way (measured finish rate × (read round trip + two engine
  steps), twice over), at least one, at most ``headroom``. Every job beyond that would only
  age in this worker's pending list while a peer might have started it. Where that estimate
  proves short (an engine step ran with a free slot, nothing waiting inside, and jobs left in
  Redis: a CPU-starved worker notices finishes late), the queue grows by one per such
  measuring window and shrinks back by one after ``CALM_WINDOWS`` windows without any.
* **Count prompts by tokens.** The ready queue (held jobs not running, plus the reads that
  fill free slots) is also capped by ``ready_token_budget`` prompt tokens, by default one
  step's ``max_num_batched_tokens``: prefill beyond that could not start in the next step
  anyway, so a few long prompts fill the queue as many short ones do.
* **KV cache past the high-water mark: only refill what finishes.** Slots that are free
  because memory is short cannot take more work; new jobs would wait inside the engine or
  be preempted. Then only the ready queue is topped up, i.e. a job is read when one of the
  ready ones got into the batch.

``admission = "fixed"`` keeps the earliest rule (``slots + headroom`` minus held jobs, whatever
the engine reports) for comparison. All subtract a publish backlog (see
:meth:`Admission.want`).

What the engine runs is known per step in aggregate only, so which held jobs wait is
inferred: the engine schedules first come first served, so the *newest* ``held - running``
held jobs are the ones not running yet (``prompt_tokens`` of those is what the feeder passes).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.engines.base import StepStats
from worker.settings import WorkerSettings

TEXT_BYTES_PER_TOKEN = 4
"""Text prompts are estimated, not tokenized (that would cost the pull loop a tokenizer run
per job, and the engine tokenizes again): about 4 bytes of UTF-8 per token for English with
the usual BPE vocabularies; token-id prompts are counted exactly."""
MESSAGE_OVERHEAD_TOKENS = 4
"""Chat-template tokens per message (role markers), roughly."""
EWMA_WEIGHT = 1 / 32
"""Weight of each new job in the running estimate of the next job's prompt size."""
READY_SAFETY = 2.0
"""The ready queue covers this many times the jobs expected to finish during one refill."""
RATE_WINDOW_S = 0.25
"""Finish rate and step time are re-measured over windows of at least this long..."""
RATE_WEIGHT = 0.3
"""...and smoothed with this weight per window."""
CALM_WINDOWS = 8
"""Windows without a starved engine step after which the learned extra ready job is dropped."""
READY_MISS = 0.001
"""Adaptive rule: chance per refill window that more jobs finish than are held ready."""
WAKE_DECAY = 0.95
"""Per measuring window, the remembered worst wake delay (see :meth:`Admission.wake_took`)
shrinks by this factor (half-life ~3.4 s): one stall keeps the queue deeper for a while."""
AHEAD_MISS = 0.01
"""Adaptive rule: chance that more jobs finish in one engine step than were read ahead of it."""
REFILL_STEPS = 2
"""Engine steps in a refill window besides the read: the step in which jobs finish (their
places are refilled at the next step's schedule) and one more for a replacement that lands
just after a schedule (the event loop and the engine's input queue add delay too)."""


@dataclass(frozen=True)
class Policy:
    engine_aware: bool
    slots: int
    ready_target: int
    """Jobs held ready beyond the free slots (``headroom``)."""
    token_budget: int
    """Prompt tokens the ready queue may hold."""
    kv_high_water: float
    adaptive: bool = False
    """Hold ``slots`` + the ready queue the finish rate needs (at least ``ready_target``)."""

    @classmethod
    def from_settings(cls, s: WorkerSettings, slots: int) -> Policy:
        return cls(engine_aware=s.admission == "engine", slots=slots, ready_target=s.headroom,
                   token_budget=s.ready_token_budget or s.max_num_batched_tokens,
                   kv_high_water=s.kv_high_water, adaptive=s.admission == "adaptive")

    @property
    def capacity(self) -> int:
        """Jobs held in the engine (and on their way to it) by the fixed rule; the adaptive
        rule's floor."""
        return self.slots + self.ready_target

    @property
    def ready_cap(self) -> int:
        """Most ready jobs a policy holds beyond the slots (``headroom = 0``: none)."""
        if self.adaptive and self.ready_target > 0:
            return max(self.ready_target, self.slots)
        return self.ready_target


@dataclass(frozen=True)
class EngineView:
    """What one admission decision looks at."""

    held: int
    """Jobs the worker holds that have not left the engine (including ones on their way)."""
    running: int
    """Requests in the engine's batch at its last step."""
    kv_usage: float
    ready_tokens: int
    """Prompt tokens of the held jobs that are not running."""
    publishing: int = 0
    """Jobs out of the engine whose results are still being written."""


def ready_target(p: Policy, finish_per_s: float, refill_s: float) -> int:
    """Jobs to hold ready beyond the free slots: what finishes during a refill, with margin."""
    if p.ready_target == 0:
        return 0
    need = math.ceil(finish_per_s * refill_s * READY_SAFETY)
    return max(1, min(p.ready_target, need))


def poisson_quantile(mean: float, miss: float) -> int:
    """Smallest n with P(X > n) <= ``miss`` for X ~ Poisson(``mean``)."""
    if mean <= 0:
        return 0
    if mean > 500:  # exp(-mean) underflows; the normal approximation is close by then
        return math.ceil(mean + 4 * math.sqrt(mean))
    term = cdf = math.exp(-mean)
    n = 0
    while 1 - cdf > miss:
        n += 1
        term *= mean / n
        cdf += term
    return n


def adaptive_ready(p: Policy, finish_per_s: float, refill_s: float) -> int:
    """The adaptive rule's ready queue: what finishes during a refill window (upper
    quantile), between ``headroom`` and the slots."""
    need = poisson_quantile(finish_per_s * refill_s, READY_MISS)
    return max(p.ready_target, min(p.ready_cap, need))


def to_read(view: EngineView, p: Policy, next_prompt_tokens: float | None,
            target: int | None = None) -> int:
    """Jobs to read now. ``next_prompt_tokens``: expected prompt size of a job still in Redis
    (None before any was seen: no token cap yet). ``target``: ready jobs wanted beyond the
    free slots (default ``p.ready_target``)."""
    # Results not yet written beyond one capacity's worth slow pulling, so a slow Redis
    # cannot pile up finished work in memory.
    if not p.engine_aware:
        ready = p.ready_target
        if p.adaptive and target is not None:
            ready = max(p.ready_target, min(p.ready_cap, target))
        backlog = max(0, view.publishing - p.slots - ready)
        return max(0, p.slots + ready - view.held - backlog)
    backlog = max(0, view.publishing - p.capacity)
    # The step may predate jobs that left since; and no engine runs more than its slots.
    running = min(view.running, view.held, p.slots)
    ready = view.held - running
    kv_bound = view.kv_usage >= p.kv_high_water
    free_slots = 0 if kv_bound else max(0, p.slots - running)
    fill = max(0, free_slots - ready)
    queued = max(0, ready - free_slots)  # ready jobs the free slots will not absorb
    extra = (p.ready_target if target is None else target) - queued
    if next_prompt_tokens:
        left = p.token_budget - view.ready_tokens - fill * next_prompt_tokens
        extra = min(extra, math.floor(left / next_prompt_tokens))
    if p.ready_target > 0:
        extra = max(extra, 1 - queued)  # one job always ready to take the next free slot
    return max(0, fill + max(0, extra) - backlog)


def prompt_tokens(body: str) -> int:
    """A job body's prompt size in tokens: exact for token ids, estimated for text and chat
    messages; 0 for a body that is not a request (it fails without reaching the engine)."""
    try:
        req = json.loads(body)
    except ValueError:
        return 0
    if not isinstance(req, dict):
        return 0
    prompt = req.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        return _text_tokens(prompt)
    messages = req.get("messages")
    if isinstance(messages, list):
        return sum(MESSAGE_OVERHEAD_TOKENS + _text_tokens(m.get("content"))
                   for m in messages if isinstance(m, dict))
    return 0


def _text_tokens(text: object) -> int:
    if not isinstance(text, str):
        return 0
    return math.ceil(len(text.encode("utf-8", "replace")) / TEXT_BYTES_PER_TOKEN)


def newest(tokens: Iterable[int], n: int) -> int:
    """Sum of the first ``n`` values (the feeder passes its held jobs newest first)."""
    return sum(itertools.islice(tokens, n)) if n > 0 else 0


class Admission:
    """The feeder's admission state: the policy, the engine's stats, and a running estimate
    of the prompt size of the jobs still in Redis."""

    def __init__(self, settings: WorkerSettings, stats: StepStats, slots: int,
                 finished: Callable[[], int] = lambda: 0,
                 starved: Callable[[], int] = lambda: 0) -> None:
        self.policy = Policy.from_settings(settings, slots)
        self.stats = stats
        self.next_prompt_tokens: float | None = None
        self.finished = finished
        """Jobs that have left the engine so far (for the finish rate)."""
        self.starved = starved
        """Starved engine steps so far (worker/state.py's ``FeederState.starved_steps``)."""
        self.finish_per_s = 0.0
        self.step_s = 0.0
        self.read_s = 0.0
        """Smoothed round trip of a read from Redis (as the pull loop saw it, CPU stalls
        included)."""
        self.wake_s = 0.0
        """Worst recent delay from a job leaving the engine to the read for its replacement
        being sent (decaying by ``WAKE_DECAY`` per window)."""
        self._mark = (time.monotonic(), 0, stats.steps)  # counts start at zero
        self.learned = 0
        """Ready jobs the engine's starved steps showed were needed beyond the estimate."""
        self._starved = starved()
        self._calm = 0

    @property
    def capacity(self) -> int:
        return self.policy.capacity

    def observe(self, body: str, flagged: bool) -> int:
        """A job was read: its prompt tokens (estimated), which also update the estimate for
        the next ones. Flagged rows (cancelled, malformed, ...) never reach the engine: 0.
        The fixed policy never looks at sizes: it skips parsing the body (0)."""
        if flagged or not self.policy.engine_aware:
            return 0
        n = prompt_tokens(body)
        prev = self.next_prompt_tokens
        self.next_prompt_tokens = n if prev is None else prev + EWMA_WEIGHT * (n - prev)
        return n

    def read_took(self, seconds: float) -> None:
        self.read_s += RATE_WEIGHT * (seconds - self.read_s)

    def wake_took(self, seconds: float) -> None:
        """A read was sent ``seconds`` after the first job it replaces left the engine."""
        self.wake_s = max(self.wake_s, seconds)

    @property
    def target(self) -> int:
        """Ready jobs wanted now (see the module docstring)."""
        p = self.policy
        if p.adaptive:
            window = self.read_s + self.wake_s + REFILL_STEPS * self.step_s
            est = adaptive_ready(p, self.finish_per_s, window)
            if p.ready_target > 0:
                est += poisson_quantile(self.finish_per_s * self.step_s, AHEAD_MISS)
            return min(max(est, self.learned), p.ready_cap)
        est = ready_target(p, self.finish_per_s, self.read_s + 2 * self.step_s)
        return min(max(est, self.learned), p.ready_target)

    def update(self) -> None:
        """Re-measure the finish rate, the step time and the starved steps once a window
        (``RATE_WINDOW_S``) has passed; the pull loop calls it before it asks :meth:`want`."""
        now, done, steps = time.monotonic(), self.finished(), self.stats.steps
        t0, done0, steps0 = self._mark
        if now - t0 < RATE_WINDOW_S:
            return
        self.finish_per_s += RATE_WEIGHT * ((done - done0) / (now - t0) - self.finish_per_s)
        if steps > steps0:
            self.step_s += RATE_WEIGHT * ((now - t0) / (steps - steps0) - self.step_s)
        self._mark = (now, done, steps)
        self.wake_s *= WAKE_DECAY
        starved = self.starved()
        if starved > self._starved:
            self.learned = min(self.policy.ready_cap, max(self.learned, self.target) + 1)
            self._calm = 0
        else:
            self._calm += 1
            if self.learned and self._calm >= CALM_WINDOWS:
                self.learned, self._calm = self.learned - 1, 0
        self._starved = starved

    def want(self, held: int, publishing: int, newest_first: Iterable[int]) -> int:
        """Jobs to read now, from the estimates as of the last :meth:`update` (no side
        effects). ``newest_first``: prompt tokens of the held jobs still in the engine, newest
        first (only as many as are not running are consumed)."""
        s = self.stats
        waiting = max(0, held - min(s.running, held, self.policy.slots))
        view = EngineView(held, s.running, s.kv_cache_usage, newest(newest_first, waiting),
                          publishing)
        return to_read(view, self.policy, self.next_prompt_tokens, self.target)
