"""Batch-size sweep: the same workload at several engine batch sizes (and admission rules),
one run each, and a table of what each size did to the batch (``--sizes``, bench/README).

Each run writes its own summary under ``RESULTS_DIR/raw/`` (with its logs); the sweep's
summary (one row per size, rule and mode) and its plot go to the output prefix.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.config import BenchConfig
from bench.refill_breakdown import breakdown_lines

ROW_KEYS = ("output_tok_s", "tokens_per_step", "mean_occupancy", "engine_steps")


def parse_sizes(text: str) -> list[tuple[int, float | None]]:
    """``256:13,512:23,1024`` → [(256, 13.0), (512, 23.0), (1024, None)]: slots, and the
    simulated engine's step time in ms at that size (None: ``--sim-step-ms``)."""
    out: list[tuple[int, float | None]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        slots, _, step = part.partition(":")
        out.append((int(slots), float(step) if step else None))
    return out


def row(slots: int, admission: str, mode: str, m: dict[str, Any]) -> dict[str, Any]:
    idle = m.get("slot_idle") or {}
    refill = m.get("refill") or {}
    full = m.get("full_step_ms") or {}
    return {"slots": slots, "admission": admission, "mode": mode,
            **{k: m.get(k) for k in ROW_KEYS},
            "free_slot_share": idle.get("free_slot_share"),
            "free_slot_steps": idle.get("free_slot_steps"), "window_steps": idle.get("steps"),
            "slot_step_idle_share": idle.get("slot_step_idle_share"),
            "free_after_full_share": (m.get("slot_idle_after_full") or {}).get(
                "free_slot_share"),
            "free_after_full_steps": (m.get("slot_idle_after_full") or {}).get(
                "free_slot_steps"),
            "refill_p50_ms": refill.get("p50_ms"), "refill_p99_ms": refill.get("p99_ms"),
            "refill_max_ms": refill.get("max_ms"), "full_step_p50_ms": full.get("p50"),
            "held_p50": (m.get("held") or {}).get("p50"),
            "held_max": (m.get("held") or {}).get("max"), "error": m.get("error"),
            "refill_breakdown": refill.get("breakdown"),
            "in_transit_at_free": idle.get("in_transit_at_free")}


def run_sweep(cfg: BenchConfig, sizes: list[tuple[int, float | None]], admissions: list[str],
              console: Console, results_dir: Path, out: str | None, argv: list[str],
              redis_boost: bool, repeat: int) -> dict[str, Any]:
    from bench import report
    from bench.runner import Runner, meta

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    prefix = Path(out) if out else results_dir / f"sizes-{stamp}"
    rows: list[dict[str, Any]] = []
    for slots, step_ms in sizes:
        for adm in admissions:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.engine.max_num_seqs = slots
            run_cfg.engine.admission = adm
            if step_ms is not None:
                run_cfg.engine.sim_step_ms = step_ms
            console.rule(f"{slots} slots, admission {adm or 'default'}")
            name = f"{prefix.name}-{slots}-{adm or 'default'}"
            res = Runner(run_cfg, console, results_dir, redis_boost=redis_boost,
                         repeat=repeat).run(argv, out_prefix=str(results_dir / "raw" / name))
            for mode, m in res["modes"].items():
                rows.append({**row(slots, adm or "default", mode, m),
                             "sim_step_ms": run_cfg.engine.sim_step_ms
                             if run_cfg.engine.engine == "sim" else None,
                             "checkpoint_interval_ms": run_cfg.engine.checkpoint_interval_ms
                             if run_cfg.engine.checkpoint_interval_ms >= 0 else None,
                             "checkpoint_outputs": run_cfg.engine.checkpoint_outputs,
                             "run": res["files"]["json"]})
    results = {"meta": meta(argv), "config": json.loads(cfg.to_json()), "sizes": rows,
               "files": report.files_for(prefix, results_dir)}
    Path(results["files"]["json"]).write_text(json.dumps(results, indent=1) + "\n")
    plot_sizes(rows, Path(results["files"]["png"]))
    console.print(sizes_table(rows))
    for line in breakdown_lines(rows):
        console.print(line, soft_wrap=True, markup=False)
    return results


def _fmt(v: Any, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def sizes_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="by batch size: free-slot steps while jobs waited, refill latency, "
                    "throughput")
    for col in ("slots", "admission", "mode", "step ms", "free-slot steps",
                "from the first full step", "slot-steps idle",
                "refill p50 / p99 / max ms", "held p50 / max", "out tok/s", "tokens/step",
                "mean occ."):
        t.add_column(col, justify="left" if col in ("admission", "mode") else "right")
    for r in rows:
        if r.get("error"):
            t.add_row(str(r["slots"]), r["admission"], r["mode"], "failed", r["error"][:40],
                      "", "", "", "", "", "", "")
            continue
        t.add_row(str(r["slots"]), r["admission"], r["mode"],
                  _fmt(r.get("full_step_p50_ms"), "{:.1f}"),
                  f"{_fmt(r['free_slot_share'], '{:.2%}')} ({r['free_slot_steps']}"
                  f"/{r['window_steps']})",
                  f"{_fmt(r.get('free_after_full_share'), '{:.2%}')} "
                  f"({_fmt(r.get('free_after_full_steps'), '{}')})",
                  _fmt(r["slot_step_idle_share"], "{:.3%}"),
                  " / ".join(_fmt(r[k], "{:.2f}") for k in ("refill_p50_ms", "refill_p99_ms",
                                                           "refill_max_ms")),
                  f"{_fmt(r['held_p50'], '{:.0f}')} / {_fmt(r['held_max'], '{:.0f}')}",
                  _fmt(r["output_tok_s"], "{:,.0f}"), _fmt(r["tokens_per_step"], "{:,.1f}"),
                  _fmt(r["mean_occupancy"], "{:.1%}"))
    return t


def plot_sizes(rows: list[dict[str, Any]], path: Path) -> None:
    """Free-slot steps and refill p99 against the batch size, one line per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import save_png

    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for adm in dict.fromkeys(r["admission"] for r in ok):
        mine = sorted((r for r in ok if r["admission"] == adm), key=lambda r: r["slots"])
        xs = [r["slots"] for r in mine]
        axes[0].plot(xs, [100 * (r["free_slot_share"] or 0) for r in mine], "o-", label=adm)
        axes[1].plot(xs, [r["refill_p99_ms"] or 0 for r in mine], "o-", label=adm)
    sizes = sorted({r["slots"] for r in ok})
    for ax, label in zip(axes, ("free-slot steps while jobs waited (%)", "refill p99 (ms)"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("engine slots")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
