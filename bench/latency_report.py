"""Live-load figures: per level, per system, from the client's samples; the table (figures and
ratios to ``vllm serve`` of the same run) and the plot of latency vs offered load.

Definitions (every time read at the client, Unix seconds, one clock):

- **offered req/s**: the level's nominal rate; **arrived req/s**: (arrivals − 1) / the last
  arrival's offset, the rate the seeded draw actually has over its span.
- **achieved req/s, out tok/s**: requests that succeeded (tokens) / (last end − level start).
- **drain s**: last end − last arrival: how far behind the system finished; past saturation it
  grows with the level's length (the backlog).
- **TTFT**: first output token read − sent. **ITL**: per request (last token − first token) /
  (tokens − 1), i.e. the mean inter-token time each request saw (TPOT); chunks that carry
  several tokens (slotfill coalesces a streaming job's output, 4 tokens / 50 ms by default)
  are spread evenly. **max gap**: the longest wait between two chunks of one request.
- **E2E**: end − sent. **queue wait**: slotfill: the job's ``started_at − queued_at`` (taken from
  Redis into the worker's feeder); serve: the mean of vLLM's own queue-time histogram (arrival
  in the engine → first scheduled).
- **lost**: no end within the drain timeout; **refused**: HTTP 429/503; **errors**: any other
  failure; **dup**: more results than one, or more tokens than asked for; **short**: a success
  with fewer tokens than asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.analysis import pct
from bench.modes.openloop import LevelRun

SYSTEMS = ("serve", "slotfill", "gateway")
LABELS = {"serve": "vllm serve (HTTP)", "slotfill": "slotfill client → Redis → worker",
          "gateway": "slotfill gateway (HTTP) → Redis → worker"}
BASE = "serve"


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 2)


def _p(xs: list[float]) -> dict[str, float | None]:
    return {"p50": _ms(pct(xs, 50)), "p99": _ms(pct(xs, 99))}


def summarize(run: LevelRun, name: str, rate: float, last_arrival: float) -> dict[str, Any]:
    """One level's figures (milliseconds for latencies)."""
    ss = run.samples
    ok = [s for s in ss if s.status == "ok"]
    ends = [s.end for s in ss if s.end is not None]
    span = (max(ends) - run.t0) if ends else None
    ttft = [s.first - s.sent for s in ok if s.first is not None]
    itl = [(s.last - s.first) / (s.n_tokens - 1) for s in ok
           if s.first is not None and s.last is not None and s.n_tokens > 1]
    e2e = [s.end - s.sent for s in ok if s.end is not None]
    waits = [s.queue_wait for s in ok if s.queue_wait is not None]
    tokens = sum(s.n_tokens for s in ok)
    return {
        "level": name, "offered_rps": round(rate, 3), "requests": len(ss), "ok": len(ok),
        # The draw's own rate: n arrivals over the span they took (a Poisson draw of
        # rate x seconds arrivals spans about, not exactly, that many seconds).
        "arrived_rps": (round((len(ss) - 1) / last_arrival, 3) if last_arrival > 0
                        else None),
        "errors": sum(s.status == "error" for s in ss),
        "refused": sum(s.status == "refused" for s in ss),
        "lost": sum(s.status == "lost" for s in ss),
        "dup": sum(s.results > 1 or s.n_tokens > s.expected_tokens for s in ss),
        "short": sum(s.n_tokens < s.expected_tokens for s in ok),
        "restarts": sum(s.restarts for s in ss),
        "achieved_rps": round(len(ok) / span, 3) if span else None,
        "out_tok_s": round(tokens / span, 1) if span else None,
        "drain_s": round(max(ends) - (run.t0 + last_arrival), 3) if ends else None,
        "ttft_ms": _p(ttft), "itl_ms": _p(itl), "e2e_ms": _p(e2e),
        "max_gap_ms": _p([s.max_gap for s in ok]),
        "queue_wait_ms": {**_p(waits), "mean": _ms(sum(waits) / len(waits)) if waits
                          else None},
        "in_flight_max": max((n for _t, n in run.in_flight), default=0),
        "send_lag_ms": _p([s.lag for s in ss]),
        "first_error": next((s.error for s in ss if s.status != "ok"), ""),
    }


def ratios(results: dict[str, Any]) -> None:
    """Each system's TTFT/ITL/E2E p50/p99 as ratios to serve's at the same level."""
    base = {lv["level"]: lv for lv in results["systems"].get(BASE, {}).get("levels", [])}
    for sysname, res in results["systems"].items():
        for lv in res.get("levels", []):
            b = base.get(lv["level"])
            if b is None or sysname == BASE:
                continue
            lv["vs_serve"] = {
                f"{k}_{q}": (round(lv[k][q] / b[k][q], 3) if lv[k][q] and b[k][q] else None)
                for k in ("ttft_ms", "itl_ms", "e2e_ms") for q in ("p50", "p99")}
            lv["vs_serve"]["ttft_p50_delta_ms"] = (
                round(lv["ttft_ms"]["p50"] - b["ttft_ms"]["p50"], 2)
                if lv["ttft_ms"]["p50"] is not None and b["ttft_ms"]["p50"] is not None
                else None)


def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown_table(results: dict[str, Any]) -> str:
    """The README table: one row per system and level."""
    head = ("| level | system | offered / achieved req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
            "| E2E p50 / p99 ms | queue wait p50 / p99 (mean) ms | drain s | max in flight "
            "| ok / lost / refused / err / dup | TTFT p50 Δ, p99 ×; E2E p99 × vs serve |")
    rows = [head, "|" + "---|" * 11]
    first: dict[str, Any] = next(iter(results["systems"].values()), {})
    names = [lv["level"] for lv in first.get("levels", [])]
    for name in names:
        for sysname in SYSTEMS:
            lv = next((x for x in results["systems"].get(sysname, {}).get("levels", [])
                       if x["level"] == name), None)
            if lv is None:
                continue
            q, vs = lv["queue_wait_ms"], lv.get("vs_serve") or {}
            rel = (f"{_f(vs.get('ttft_p50_delta_ms'), '{:+,.1f}')} ms, "
                   f"{_f(vs.get('ttft_ms_p99'), '{:.2f}')}×; {_f(vs.get('e2e_ms_p99'), '{:.2f}')}×"
                   if vs else "(base)")
            rows.append(
                f"| {name} | {sysname} | {lv['offered_rps']:.2f} / {_f(lv['achieved_rps'], '{:.2f}')}"
                f" | {_f(lv['ttft_ms']['p50'])} / {_f(lv['ttft_ms']['p99'])}"
                f" | {_f(lv['itl_ms']['p50'], '{:.1f}')} / {_f(lv['itl_ms']['p99'], '{:.1f}')}"
                f" | {_f(lv['e2e_ms']['p50'])} / {_f(lv['e2e_ms']['p99'])}"
                f" | {_f(q['p50'])} / {_f(q['p99'])} ({_f(q['mean'])})"
                f" | {_f(lv['drain_s'], '{:.1f}')} | {lv['in_flight_max']}"
                f" | {lv['ok']} / {lv['lost']} / {lv['refused']} / {lv['errors']} / {lv['dup']}"
                f" | {rel} |")
    return "\n".join(rows)


def plot(results: dict[str, Any], path: Path) -> None:
    """TTFT, ITL and E2E (p50 solid, p99 dashed) and achieved throughput vs offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import save_png

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    panels = (("ttft_ms", "TTFT ms"), ("itl_ms", "ITL ms"), ("e2e_ms", "E2E ms"))
    for sysname, res in results["systems"].items():
        lvs = [lv for lv in res.get("levels", []) if lv["level"] != "burst"]
        x = [100 * lv["offered_rps"] / results["capacity_rps"] for lv in lvs]
        for ax, (key, title) in zip(axes, panels, strict=False):
            line = ax.plot(x, [lv[key]["p50"] for lv in lvs], marker="o", label=sysname)[0]
            ax.plot(x, [lv[key]["p99"] for lv in lvs], ls="--", color=line.get_color())
            ax.set_title(f"{title} (p50 —, p99 --), log scale", fontsize=9)
            ax.set_yscale("log")  # tens of ms below saturation, seconds past it
        axes[3].plot(x, [100 * (lv["achieved_rps"] or 0) / results["capacity_rps"]
                         for lv in lvs], marker="o", label=sysname)
    axes[3].plot([0, 125], [0, 125], color="grey", lw=0.5)
    axes[3].set_title("achieved, % of offline capacity", fontsize=9)
    for ax in axes:
        ax.set_xlabel("offered load, % of offline capacity", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"latency vs offered load — {results['meta'].get('device', '')}, capacity "
                 f"{results['capacity_rps']:.2f} req/s", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
