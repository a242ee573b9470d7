"""A small run of ``python -m bench.cluster_scale`` (1 master vs 3, and one queue of 3 shards
on 3 masters) so the harness keeps working: every job succeeds, the queues (or shards) land
on three masters, and the figures the README quotes are there. Never asserts timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cluster_scale import run, spread_queues

pytestmark = pytest.mark.slow


def test_one_master_and_three(tmp_path: Path) -> None:
    assert len(set(spread_queues(3))) == 3
    for masters, sharded in ((1, False), (3, False), (3, True)):
        row = run(masters, jobs=300, slots=16, step_ms=2.0, seed=0, workdir=tmp_path,
                  sharded=sharded)
        assert row["masters"] == masters and row["jobs"] == 300
        assert len(row["queues"]) == 3  # three queues, or one queue's three shards
        assert row["succeeded"] == 300
        assert row["jobs_per_s"] > 0 and row["redis_cpu_usec_per_job"] > 0
        assert row["commands_per_job"] > 0
