"""The live-load bench (``python -m bench latency``): its arrival process is seeded and
Poisson-shaped, and a small open-loop run through slotfill (client → Redis → a sim-engine
worker) ends every request exactly once with its exact token count. No timing is asserted."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from pathlib import Path

import pytest

from bench.arrivals import burst_arrivals, levels, poisson_arrivals
from bench.config import BenchConfig, EngineConfig, WorkloadConfig
from bench.latency_report import summarize
from bench.modes import live_slotfill
from bench.modes.openloop import drive
from bench.workload import make_workload
from slotfill.testing.redis_server import RedisServer


def test_arrivals_are_seeded_and_scale_with_the_rate() -> None:
    a = poisson_arrivals(500, 4.0, seed=1)
    assert a == poisson_arrivals(500, 4.0, seed=1)
    assert a != poisson_arrivals(500, 4.0, seed=2)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    # One unit-rate draw per seed: another rate only changes the speed.
    b = poisson_arrivals(500, 8.0, seed=1)
    assert b == pytest.approx([x / 2 for x in a])


def test_arrivals_are_poisson_shaped() -> None:
    rate, n = 5.0, 20_000
    t = poisson_arrivals(n, rate, seed=3, exact=False)
    assert poisson_arrivals(n, rate, seed=3)[-1] == pytest.approx((n - 1) / rate)
    gaps = [y - x for x, y in itertools.pairwise(t)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: standard deviation = mean, and P(gap > mean) = 1/e.
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.05)
    assert sum(g > mean for g in gaps) / len(gaps) == pytest.approx(0.3679, abs=0.015)
    # Counts in 1 s windows: Poisson, variance = mean.
    counts = [0] * int(t[-1])
    for x in t:
        if int(x) < len(counts):
            counts[int(x)] += 1
    assert statistics.fmean(counts) == pytest.approx(rate, rel=0.03)
    assert statistics.pvariance(counts) / statistics.fmean(counts) == pytest.approx(1.0, rel=0.1)


def test_levels_and_burst() -> None:
    lv = levels(10.0, [0.5, 1.2], seconds=20, seed=0, burst_fraction=2.0, burst_seconds=5)
    assert [x.name for x in lv] == ["50%", "120%", "burst"]
    assert [x.rate for x in lv] == [5.0, 12.0, 20.0]
    assert [len(x.arrivals) for x in lv[:2]] == [100, 240]
    assert len(lv[2].arrivals) == 100 and all(t < 5 for t in lv[2].arrivals)
    # Each level's draw has exactly its nominal rate over its span.
    for x in lv:
        assert (len(x.arrivals) - 1) / x.arrivals[-1] == pytest.approx(x.rate)
    assert burst_arrivals(20.0, 5, seed=0) == lv[2].arrivals
    assert lv == levels(10.0, [0.5, 1.2], seconds=20, seed=0, burst_fraction=2.0,
                        burst_seconds=5)


@pytest.mark.slow
def test_open_loop_through_slotfill_loses_nothing(redis_server: RedisServer,
                                                  tmp_path: Path) -> None:
    cfg = BenchConfig(engine=EngineConfig(engine="sim", sim_step_ms=3, max_num_seqs=8,
                                          headroom=2),
                      workload=WorkloadConfig(requests=60, prompt_tokens=8, min_output=2,
                                              max_output=12, seed=5))
    cfg.model_path = "sim-model"
    reqs = make_workload(cfg.workload, vocab_size=500)
    # Twice the rate the sim engine serves (8 slots, 3 ms steps, ~7 tokens a request is
    # ~380 req/s): a queue builds up and must drain with nothing lost or repeated.
    arrivals = poisson_arrivals(len(reqs), 200.0, seed=0)

    async def run() -> list[dict[str, object]]:
        client = live_slotfill.client(redis_server.url)
        try:
            send = live_slotfill.sender(client, w, timeout=60)
            level = await drive(reqs, arrivals, send, drain_timeout=60)
            return [summarize(level, "x", 200.0, arrivals[-1]), *[
                s.to_dict() for s in level.samples]]
        finally:
            await client.close()

    with live_slotfill.worker(cfg, redis_server.url, tmp_path, ready_timeout=120) as w:
        summary, *samples = asyncio.run(run())
    assert summary["requests"] == summary["ok"] == len(reqs), summary["first_error"]
    assert (summary["lost"], summary["dup"], summary["short"], summary["errors"]) == (0, 0, 0, 0)
    assert sorted(s["index"] for s in samples) == list(range(len(reqs)))
    for s, q in zip(samples, reqs, strict=True):
        assert s["n_tokens"] == q.max_tokens and s["results"] == 1
        assert s["first"] is not None and s["queue_wait"] is not None
