"""A small run of ``python -m slotfill.testing.redis_steps``: every job goes through every step
of its life, and each step runs the Redis commands its Lua step is made of (the figures in
bench/README.md, "Redis cost", are per step). Never asserts timings."""

from __future__ import annotations

from pathlib import Path

from slotfill.testing.redis_steps import measure


def test_each_step_of_a_jobs_life_is_measured_apart(tmp_path: Path) -> None:
    out = measure(500, claim=32, finish=16, aof=False, log_dir=tmp_path)
    steps = out["steps"]
    assert list(steps) == ["submit", "register", "start", "finish", "read"]
    calls = {name: row["commands_per_job"] for name, row in steps.items()}
    # Per job, beside each call's own few: EXISTS, XADD, HSET | HMGET, HSET (the waiter) |
    # HMGET, HSET (running) | HMGET, HSET (the result), EXPIRE, RPUSH (to the waiter list).
    assert 3 <= calls["submit"] < 3.2, calls
    assert 2 <= calls["register"] < 2.1, calls
    assert 2 <= calls["start"] < 2.5, calls
    assert 4 <= calls["finish"] < 4.6, calls
    assert calls["read"] < 0.1, calls  # BLMPOP: one per 1,000 results
    assert all(steps[s]["redis_cpu_usec_per_job"] > 0 for s in ("submit", "start", "finish"))
    assert out["redis_cpu_usec_per_job"] == round(sum(
        row["redis_cpu_usec_per_job"] for row in steps.values()), 1)
