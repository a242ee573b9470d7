"""Where refill latency goes: each refill (bench/analysis.py's definition) matched to the
worker's read that brought its replacement (worker/refill_trace.py's read log).

Per refill k with ``refill_k = start[C+k] - end[k] > 0`` (a replacement read ahead counts 0
and has no parts), the read ``j`` that returned last before ``start[C+k]``:

- **wait**: ``end[k]`` → read j issued (0 when read j was issued before the finish);
  **behind**: a read was already on its way to Redis at ``end[k]`` (the replacement waited
  for that reply, then for its own read);
- **read**: read j's round trip, counted from ``end[k]`` when it was issued earlier;
- **launch**: read j back → ``start[C+k]`` (the loop handing the rows to job tasks);
- **dry**: at read j the engine's last step had a free slot and nothing waiting (the ready
  queue had run out: this refill cost the engine a slot), else the engine had jobs queued;
- **lag_ms**: the event loop's worst lateness in the 100 ms before read j came back;
  **gc_ms**: garbage-collector time since the read before it.

The summary gives percentiles of the parts over every positive refill, and their means over
the tail (refills at or above the p99), so a GPU run says which part the tail is made of.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from pathlib import Path
from typing import Any

from worker.refill_trace import read_log_path


def load_reads(steps_file: str | Path | None) -> list[dict[str, Any]]:
    if not steps_file:
        return []
    path = read_log_path(steps_file)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed process
    return sorted(out, key=lambda r: r["t_back"])


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def refill_parts(records: list[dict[str, Any]], capacity: int, slots: int,
                 reads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per positive refill: its latency and parts, in ms."""
    ends = sorted(r["finished"] for r in records)
    starts = sorted(r["started"] for r in records)
    backs = [r["t_back"] for r in reads]
    issues = sorted((r["t_issue"], r["t_back"]) for r in reads)
    out = []
    for k in range(len(starts) - capacity):
        end, start = ends[k], starts[capacity + k]
        if start <= end:
            continue
        j = bisect.bisect_right(backs, start) - 1
        if j < 0:
            continue
        rd = reads[j]
        i = bisect.bisect_right(issues, (end, float("inf"))) - 1
        behind = i >= 0 and issues[i][0] <= end < issues[i][1] and issues[i][1] < rd["t_back"]
        out.append({
            "refill_ms": (start - end) * 1000,
            "wait_ms": max(0.0, rd["t_issue"] - end) * 1000,
            "read_ms": (rd["t_back"] - max(rd["t_issue"], end)) * 1000,
            "launch_ms": max(0.0, start - rd["t_back"]) * 1000,
            "behind": behind,
            "dry": rd["waiting"] == 0 and rd["running"] < slots,
            "lag_ms": rd["lag_ms"], "gc_ms": rd["gc_ms"]})
    return out


def _mean(parts: list[dict[str, Any]], key: str) -> float | None:
    return statistics.fmean(float(p[key]) for p in parts) if parts else None


def summarize_breakdown(records: list[dict[str, Any]], capacity: int, slots: int,
                        steps_file: str | Path | None) -> dict[str, Any] | None:
    """The refill breakdown of one run (None without a read log)."""
    reads = load_reads(steps_file)
    if not reads:
        return None
    parts = refill_parts(records, capacity, slots, reads)
    lat = [p["refill_ms"] for p in parts]
    p99 = _pct(lat, 99)
    tail = [p for p in parts if p99 is not None and p["refill_ms"] >= p99]
    lags = [float(r["lag_ms"]) for r in reads]
    rtts = [(r["t_back"] - r["t_issue"]) * 1000 for r in reads]
    return {
        "reads": len(reads), "positive_refills": len(parts),
        "read_rtt_p50_ms": _pct(rtts, 50), "read_rtt_p99_ms": _pct(rtts, 99),
        "loop_lag_p50_ms": _pct(lags, 50), "loop_lag_p99_ms": _pct(lags, 99),
        "loop_lag_max_ms": max(lags), "gc_total_ms": sum(float(r["gc_ms"]) for r in reads),
        "reads_behind_share": sum(1 for r in reads if r.get("behind")) / len(reads),
        "parts_p50_ms": {k: _pct([p[k] for p in parts], 50)
                         for k in ("wait_ms", "read_ms", "launch_ms")},
        "parts_p99_ms": {k: _pct([p[k] for p in parts], 99)
                         for k in ("wait_ms", "read_ms", "launch_ms")},
        "tail": {"n": len(tail), "from_ms": p99,
                 **{f"mean_{k}": _mean(tail, k)
                    for k in ("refill_ms", "wait_ms", "read_ms", "launch_ms", "lag_ms",
                              "gc_ms")},
                 "behind_share": _mean(tail, "behind"), "dry_share": _mean(tail, "dry")},
        "dry_share": _mean(parts, "dry"),
    }


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def breakdown_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One plain line per sweep row that has a breakdown (slotfill with the worker's read
    log): plain text, so a narrow log keeps every figure."""
    out = []
    for r in rows:
        b = r.get("refill_breakdown")
        if not b:
            continue
        tail = b["tail"]
        ckpt = r.get("checkpoint_interval_ms")
        out.append(
            f"refill breakdown {r['slots']} slots {r['admission']}"
            f"{'' if ckpt is None else f' ckpt {ckpt:.0f} ms'}"
            f"{' ckpt from outputs' if r.get('checkpoint_outputs') else ''}: "
            f"reads {b['reads']} rtt p50/p99 {_f(b['read_rtt_p50_ms'])}/"
            f"{_f(b['read_rtt_p99_ms'])} ms; loop lag p50/p99/max "
            f"{_f(b['loop_lag_p50_ms'])}/{_f(b['loop_lag_p99_ms'])}/{_f(b['loop_lag_max_ms'])}"
            f" ms; gc {_f(b['gc_total_ms'], '{:.0f}')} ms; refills > 0: "
            f"{b['positive_refills']} (dry {_f(b['dry_share'], '{:.1%}')}); tail (>= "
            f"{_f(tail['from_ms'])} ms, n {tail['n']}): wait/read/launch "
            + "/".join(_f(tail[f"mean_{k}"]) for k in ("wait_ms", "read_ms", "launch_ms"))
            + f" ms, behind a read {_f(tail['behind_share'], '{:.0%}')}, dry "
            f"{_f(tail['dry_share'], '{:.0%}')}, lag {_f(tail['mean_lag_ms'])} ms, gc "
            f"{_f(tail['mean_gc_ms'])} ms; free-slot steps {r.get('free_slot_steps')}"
            f"/{r.get('window_steps')}, in transit at them p50/max "
            f"{_f((r.get('in_transit_at_free') or {}).get('p50'), '{:.0f}')}/"
            f"{_f((r.get('in_transit_at_free') or {}).get('max'), '{:.0f}')}")
    return out
