"""From a mode's raw result (per-request timings, engine step log) to its summary figures.

Definitions (every mode is measured the same way):

- **wall**: first submit → last result seen by the submitter (offline: ``LLM.generate`` call →
  return). Output tokens/s and requests/s are over this wall time.
- **TTFT** / **end-to-end**: submit → first token / → finished. **queue wait**: submit → the
  request is first scheduled by the engine (vLLM's ``scheduled_ts``); slotfill results do not
  carry that, so there it is submit → pulled from Redis by the worker (``started_at``; after
  that a job waits at most behind ``headroom`` others inside the engine).
- **free-slot steps** (slot idle): share of engine steps, from the first step of the run to
  the last request's start (while requests still waited outside the engine: in Redis, in a
  broker, in the feeder's list), after which ``running < max_num_seqs`` and ``waiting == 0``,
  i.e. the next step runs with a free slot nobody inside the engine can take.
  **slot-step idle** weighs each such step by its number of free slots. ``slot_idle_after_full``
  counts the same from the first step that ran every slot: without the first steps, which
  run while the submitted jobs are still landing in Redis.
- **in transit at free-slot steps**: the worker's ``held`` minus the engine's running and
  waiting at each free-slot step (jobs handed over but not yet in the engine's counts, or
  finished in that step): large means the hand-over to the engine left the slot free, not
  admission holding too few.
- **refill latency** (slotfill, asyncio): a place frees when a generation ends; its
  replacement is the request that enters the engine in its place. With capacity C (slots +
  headroom) held, the k-th place to free (by time) is refilled by the (C+k)-th request to start,
  so refill_k = start[C+k] - end[k], for every k whose replacement exists (the queue was not
  empty). slotfill: end = the worker's ``finished_at`` (taken when the generation returns,
  before the result is written), start = ``started_at`` (right after the ``start_jobs`` read
  returned, just before the request is handed to the engine). C is ``slots + headroom``, the
  fixed count; the adaptive rule holds at least that many and more when finishes come fast,
  so a replacement it read ahead of the finish counts as 0 (read before it was needed).
- **full-step ms**: time between consecutive engine steps that both ran every slot: the
  engine's own speed, slowed on a small CPU box by whatever else takes CPU (``cpu_s``).
- **mean occupancy**: time-weighted mean of ``running / max_num_seqs`` over the wall time;
  gaps between engine steps much longer than a step (an idle engine makes no steps) count as
  zero.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.refill_breakdown import summarize_breakdown


def pct(values: list[float], p: float) -> float | None:
    """Percentile (nearest rank, 0 < p <= 100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def load_steps(path: str | Path | None) -> list[dict[str, Any]]:
    if not path or not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed process
    return out


def idle_gap_threshold(steps: list[dict[str, Any]]) -> float:
    """Longer than this between two steps = the engine sat idle in between."""
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(steps) if b["t"] > a["t"]]
    typical = statistics.median(gaps) if gaps else 0.01
    return max(5 * typical, 0.05)


def occupancy_series(steps: list[dict[str, Any]], t_start: float, t_end: float
                     ) -> tuple[list[float], list[float]]:
    """(seconds since t_start, running) as a step curve, with idle gaps drawn as zero."""
    steps = [s for s in steps if t_start - 1 <= s["t"] <= t_end + 1]
    xs: list[float] = [0.0]
    ys: list[float] = [0.0]
    if not steps:
        return [0.0, t_end - t_start], [0.0, 0.0]
    thr = idle_gap_threshold(steps)
    prev_t = t_start
    for s in steps:
        t = s["t"] - t_start
        if s["t"] - prev_t > thr:
            xs += [prev_t - t_start, t - thr / 5]
            ys += [0.0, 0.0]
        xs.append(t)
        ys.append(float(s["running"]))
        prev_t = s["t"]
    xs.append(t_end - t_start)
    ys.append(0.0)
    return xs, ys


def mean_occupancy(steps: list[dict[str, Any]], t_start: float, t_end: float,
                   slots: int) -> float | None:
    steps = [s for s in steps if t_start <= s["t"] <= t_end]
    if not steps or t_end <= t_start:
        return None
    thr = idle_gap_threshold(steps)
    busy_step = thr / 5
    area, prev = 0.0, t_start
    for s in steps:
        dt = s["t"] - prev
        if dt > thr:
            dt = busy_step
        area += dt * s["running"]
        prev = s["t"]
    return area / ((t_end - t_start) * slots)


def slot_idle(steps: list[dict[str, Any]], t_from: float, t_to: float,
              slots: int) -> dict[str, Any]:
    """Steps after which a slot is free with nothing waiting inside the engine, while
    requests still wait outside it (t_from .. t_to = first step .. last request's start)."""
    window = [s for s in steps if t_from <= s["t"] <= t_to]
    if not window:
        return {"steps": 0, "free_slot_steps": 0, "free_slot_share": None,
                "slot_step_idle_share": None, "gap_p50_ms": None, "gap_p99_ms": None}
    free = [s for s in window if s["running"] < slots and s["waiting"] == 0]
    idle_slots = sum(slots - s["running"] for s in free)
    # Episodes: consecutive free-slot steps; duration until the next step that is full again.
    gaps: list[float] = []
    start: float | None = None
    for s in window:
        is_free = s["running"] < slots and s["waiting"] == 0
        if is_free and start is None:
            start = s["t"]
        elif not is_free and start is not None:
            gaps.append(s["t"] - start)
            start = None
    p50, p99 = pct(gaps, 50), pct(gaps, 99)
    # Held by the worker but in neither of the engine's counts at a free-slot step: on their
    # way in (job task, input processing) or finished this step (their output not yet
    # seen). Many: the hand-over to the engine, not admission, left the slot free.
    transit = [float(s["held"] - s["running"] - s["waiting"]) for s in free if "held" in s]
    return {
        "steps": len(window),
        "free_slot_steps": len(free),
        "free_slot_share": len(free) / len(window),
        "slot_step_idle_share": idle_slots / (len(window) * slots),
        "gap_episodes": len(gaps),
        "gap_p50_ms": None if p50 is None else p50 * 1000,
        "gap_p99_ms": None if p99 is None else p99 * 1000,
        "in_transit_at_free": {"p50": pct(transit, 50), "max": max(transit)}
        if transit else None,
    }


def held_figures(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Jobs the worker held (its step log's ``held``: in the engine or on their way) at each
    step: how deep its admission rule filled beyond the slots."""
    held = [float(s["held"]) for s in steps if "held" in s]
    if not held:
        return None
    return {"p50": pct(held, 50), "max": max(held)}


def refill_latencies(records: list[dict[str, Any]], capacity: int) -> list[float]:
    """refill_k = start[C+k] - end[k] (see the module docstring), in seconds."""
    ends = sorted(r["finished"] for r in records)
    starts = sorted(r["started"] for r in records)
    return [max(0.0, starts[capacity + k] - ends[k]) for k in range(len(starts) - capacity)]


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def summarize(raw: dict[str, Any], expected: dict[int, int], slots: int,
              capacity: int | None) -> dict[str, Any]:
    """The figures of one mode. ``expected``: request index → its exact output length."""
    recs: list[dict[str, Any]] = raw["records"]
    t0, t1 = raw["t_start"], raw["t_end"]
    wall = max(t1 - t0, 1e-9)
    exact = sum(1 for r in recs if expected.get(r["index"]) == r["output_tokens"])
    tokens = sum(r["output_tokens"] for r in recs)
    ttft = [r["first_token"] - r["submitted"] for r in recs if r.get("first_token")]
    e2e = [r["finished"] - r["submitted"] for r in recs]
    qwait = [(r.get("scheduled") or r["started"]) - r["submitted"] for r in recs]
    steps = load_steps(raw.get("steps_file"))
    last_start = max((r["started"] for r in recs), default=t0)
    first_step = next((s["t"] for s in steps if s["t"] >= t0), t0)
    first_full = next((s["t"] for s in steps if s["t"] >= t0 and s["running"] >= slots), None)
    in_run = [st for st in steps if t0 <= st["t"] <= t1]
    full_dt = [b["t"] - a["t"] for a, b in itertools.pairwise(in_run)
               if a["running"] >= slots and b["running"] >= slots]
    out: dict[str, Any] = {
        "requests": len(expected),
        "completed": len(recs),
        "exact_token_counts": exact,
        "all_exact": exact == len(expected) and len(recs) == len(expected),
        "wall_s": wall,
        "startup_s": raw.get("startup_s"),
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "req_s": len(recs) / wall,
        "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
        "e2e_p50_ms": _ms(pct(e2e, 50)), "e2e_p99_ms": _ms(pct(e2e, 99)),
        "queue_wait_p50_ms": _ms(pct(qwait, 50)), "queue_wait_p99_ms": _ms(pct(qwait, 99)),
        "engine_steps": len(in_run),
        "tokens_per_step": tokens / len(in_run) if in_run else None,
        "full_step_ms": {"mean": _ms(statistics.mean(full_dt)) if full_dt else None,
                         "p50": _ms(pct(full_dt, 50)), "n": len(full_dt)},
        "mean_occupancy": mean_occupancy(steps, t0, t1, slots),
        "held": held_figures(in_run),
        "slot_idle": slot_idle(steps, first_step, last_start, slots),
        "slot_idle_after_full": slot_idle(steps, first_full, last_start, slots)
        if first_full is not None else None,
    }
    if capacity:
        refills = refill_latencies(recs, capacity)
        out["refill"] = {"capacity": capacity, "n": len(refills),
                         "p50_ms": _ms(pct(refills, 50)), "p99_ms": _ms(pct(refills, 99)),
                         "max_ms": _ms(max(refills) if refills else None),
                         "breakdown": summarize_breakdown(recs, capacity, slots,
                                                          raw.get("steps_file"))}
    out.update(raw.get("extra", {}))
    return out
