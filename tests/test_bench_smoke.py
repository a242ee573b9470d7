"""A small run of ``python -m bench`` so the harness keeps working. Never asserts timings.

Two engines (offline, then slotfill through Redis and a worker) one after the other, a small
submit measurement and a small sim-engine soak; checks that every request completed with
its exact token count, and that the JSON has the figures the report promises. The run starts
with the session, in the background at a low priority (tests/conftest.py, ``bench_smoke``):
its engine boots take the CPU the other tests leave while they wait on leases and polls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def smoke_command(tmp_path: Path) -> list[str]:
    """The run: results in ``tmp_path``, the summary's prefix ``tmp_path / "smoke"``."""
    return [sys.executable, "-m", "bench", "--requests", "40", "--prompt-tokens", "16",
            "--min-prompt-tokens", "4", "--min-output", "4", "--max-output", "24",
            "--max-num-seqs", "8", "--headroom", "4", "--max-model-len", "128",
            "--max-num-batched-tokens", "512", "--modes", "offline,slotfill", "--enforce-eager",
            "--submit-jobs", "500", "--submit-depth", "1000", "--soak-jobs", "500",
            "--results-dir", str(tmp_path), "--out", str(tmp_path / "smoke")]


def test_bench_small_run(bench_smoke: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, tmp_path = bench_smoke
    out = tmp_path / "smoke"
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("the bench smoke run did not end in 900 s")
    output = (tmp_path / "output.txt").read_text(errors="replace")
    assert proc.returncode == 0, output[-8000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    # The summary holds figures only; the series the plot is drawn from are raw files.
    assert data["files"]["series"] == str(tmp_path / "raw" / "smoke.series.json")
    series = json.loads(Path(data["files"]["series"]).read_text())
    assert (tmp_path / "raw").is_dir() and not list(tmp_path.glob("*.raw.json"))

    assert data["workload"]["requests"] == 40
    for name in ("offline", "slotfill"):
        m = data["modes"][name]
        assert m["completed"] == m["requests"] == 40, m
        assert m["exact_token_counts"] == 40 and m["all_exact"]
        assert m["output_tokens"] == data["workload"]["output_tokens"]
        for key in ("output_tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
                    "e2e_p99_ms", "queue_wait_p50_ms", "queue_wait_p99_ms", "wall_s"):
            assert m[key] is not None and m[key] >= 0, (name, key)
        assert m["ratio_to_offline"] > 0
        assert "occupancy" not in m
        xs, ys = series["modes"][name]["occupancy"]
        assert len(xs) == len(ys) > 2 and max(ys) <= 8
    assert data["modes"]["offline"]["ratio_to_offline"] == pytest.approx(1.0)

    sf = data["modes"]["slotfill"]
    assert sf["refill"]["n"] == 40 - (8 + 4)
    assert sf["slot_idle"]["steps"] > 0
    assert 0 <= sf["slot_idle"]["free_slot_share"] <= 1
    # finish_job runs once per job; submit_many sends its submits as one batched script call.
    assert sf["redis"]["script_calls_per_job"] >= 1

    sub = data["submit"]
    assert sub["submit_jobs_s"] > 0 and sub["submit_many_jobs_s"] > 0
    empty, deep = sub["depths"]["empty"], sub["depths"]["deep"]
    assert deep["depth_before"] > empty["depth_before"] == 0
    assert empty["by_command"]["xadd"] == deep["by_command"]["xadd"] == 1

    soak = data["soak"]
    assert "rss_samples" not in soak and series["soak_rss_samples"]
    assert soak["finished"].get("finished_succeeded") == 500
    assert soak["rss_mib"]["start"] > 0 and soak["rss_mib"]["end"] > 0
    assert set(data["targets"]) >= {"slotfill / offline (output tok/s)",
                                    "slotfill refill latency p99 (ms)"}
