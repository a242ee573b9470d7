"""Open-loop arrival times: when each request of a live-load run is sent, whatever the
system under test is doing (a closed loop would slow its senders down with the system and
hide its queueing).

Every schedule is a list of offsets in seconds from the run's start. The Poisson process is
drawn once at unit rate from the seed and scaled by 1/rate, so every offered load of one run
sends the same requests in the same order with the same relative gaps: loads differ only in
speed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def unit_gaps(n: int, seed: int) -> list[float]:
    """``n`` exponential inter-arrival gaps of mean 1 (a Poisson process at rate 1)."""
    rng = random.Random(f"arrivals-{seed}")
    return [rng.expovariate(1.0) for _ in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int, exact: bool = True) -> list[float]:
    """Offsets of ``n`` Poisson arrivals at ``rate`` per second; the first comes at 0.

    ``exact``: the draw is scaled so that its arrivals span exactly (n − 1) / rate seconds
    (the process conditioned on its count: gaps keep their exponential shape, the level its
    nominal rate). Unscaled, a 15 s level's own rate is off by up to ±25 % (seen here), and
    a "75 %" level may offer more than the "90 %" one."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    gaps = unit_gaps(n, seed)[1:]
    scale = (len(gaps) / sum(gaps)) if exact and gaps else 1.0
    out, t = [0.0], 0.0
    for gap in gaps:
        t += gap * scale / rate
        out.append(t)
    return out


def burst_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Poisson arrivals at ``rate`` for about ``seconds`` (rate x seconds of them), then none
    (the quiet after a burst is the drain the run waits for)."""
    n = max(1, round(rate * seconds))
    return poisson_arrivals(n, rate, seed)


@dataclass(frozen=True)
class Level:
    """One step of a live-load run: a share of the measured capacity and its arrivals."""

    name: str
    """``25%`` ... ``120%``, or ``burst``."""
    fraction: float
    """Offered load / capacity (the burst's rate while it lasts)."""
    rate: float
    """Offered requests per second."""
    arrivals: list[float]


def levels(capacity: float, fractions: list[float], seconds: float, seed: int,
           burst_fraction: float = 0.0, burst_seconds: float = 10.0,
           min_requests: int = 8) -> list[Level]:
    """One Poisson level per fraction of ``capacity`` (req/s), each about ``seconds`` long
    (at least ``min_requests``); then a burst at ``burst_fraction`` x capacity for
    ``burst_seconds`` if ``burst_fraction`` > 0. Every level scales the same unit draw (one
    seed), so levels differ in speed only."""
    out = []
    for f in fractions:
        rate = f * capacity
        n = max(min_requests, round(rate * seconds))
        out.append(Level(f"{100 * f:g}%", f, rate, poisson_arrivals(n, rate, seed)))
    if burst_fraction > 0:
        rate = burst_fraction * capacity
        out.append(Level("burst", burst_fraction, rate,
                         burst_arrivals(rate, burst_seconds, seed)))
    return out
