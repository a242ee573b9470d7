"""The pull loop's own state and counters, apart from the engine's step stats.

The engine writes :class:`~worker.engines.base.StepStats`; the feeder writes these; upkeep,
metrics and the step log only read them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.engines.base import Step


@dataclass
class Counters:
    results: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    reclaimed: int = 0
    adopted: int = 0
    """Own entries taken back after the reply of the claim that gave them was lost."""
    dead_lettered: int = 0
    output_tokens: int = 0
    max_in_flight: int = 0
    solo_runs: int = 0
    """Rows run alone in the engine (culprit isolation)."""
    leases_lost: int = 0
    """In-flight entries a peer took over (this worker was too slow to renew)."""
    released: int = 0
    """Entries given back unfinished (drain past the grace period, engine death)."""
    publish_retries: int = 0
    """Result writes retried because Redis was unavailable."""

    def count(self, status: str) -> None:
        self.results[status] = self.results.get(status, 0) + 1

    @property
    def finished(self) -> int:
        """Results this worker published."""
        return sum(self.results.values())


@dataclass
class FeederState:
    """What the pull loop is doing, as the step log, the watchdog and the metrics see it."""

    pulling: bool = True
    """Still taking new work (False once draining or dead)."""
    reading: bool = False
    """A read of new jobs is on its way to Redis: a step with a free slot then is Redis
    latency (or a starved CPU), not a feeder that forgot to pull."""
    backlog: bool = False
    """The last read filled every free place, so more jobs wait in Redis."""
    starved_steps: int = 0
    """Engine steps with a free slot, nothing waiting inside the engine to take it, and jobs
    waiting in Redis (as the last read saw it): the idle time slotfill is to blame for."""
    busy_since: float = field(default_factory=time.monotonic)
    """When the engine last got work while it had none: the hang watchdog measures from this
    or the last step, whichever is later (an idle engine makes no steps)."""

    def on_step(self, step: Step) -> None:
        """A subscriber to the engine's steps."""
        if not step.full and step.waiting == 0 and self.backlog:
            self.starved_steps += 1
