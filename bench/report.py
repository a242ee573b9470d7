"""Ratios, targets, the terminal tables, the result files and the occupancy plot.

A run's results are written as two files: the summary (``PREFIX.json``, every figure, no
series: small enough to commit) and its series (``RESULTS_DIR/raw/NAME.series.json``, ignored
by git: each mode's occupancy curve and the soak's RSS samples), plus the plot drawn from the
series (``PREFIX.png``). :func:`load_results` puts the two back together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

MODE_LABELS = {
    "offline": "offline LLM.generate",
    "slotfill": "slotfill (Redis + worker)",
    "asyncio": "asyncio feeder, no Redis",
    "celery_batch": "celery, static batch/task",
    "celery_per_request": "celery, 1 request/task",
    "fleet": "fleet, engine-aware admission",
    "fleet_fixed": "fleet, fixed-count admission",
    "fleet_adaptive": "fleet, adaptive admission",
}


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pair(a: Any, b: Any, fmt: str = "{:,.0f}") -> str:
    return f"{_num(a, fmt)} / {_num(b, fmt)}"


def add_ratios(results: dict[str, Any]) -> None:
    modes = results.get("modes", {})
    base = modes.get("offline", {}).get("output_tok_s")
    plain = modes.get("slotfill", {}).get("output_tok_s")
    for name, m in modes.items():
        tps = m.get("output_tok_s")
        m["ratio_to_offline"] = tps / base if base and tps else None
        if name.startswith("stream@"):
            m["ratio_to_slotfill"] = tps / plain if plain and tps else None
        n = len(m.get("workers") or {})
        if n and (results.get("config") or {}).get("gpus"):  # one worker per GPU (--gpus)
            m["scaling"] = tps / (n * base) if base and tps else None
            split = modes.get("offline_split", {}).get("output_tok_s")
            if split:  # k engines that each ran their share alone: the reachable base
                m["scaling_vs_split"] = tps / split if tps else None


def stream_table(results: dict[str, Any]) -> Table | None:
    """Streaming modes next to the plain slotfill mode of the same run."""
    modes = results.get("modes", {})
    rows = [(n, m) for n, m in modes.items() if n.startswith("stream@") and "error" not in m]
    if not rows:
        return None
    t = Table(title="Token streaming: every job streams vs the plain slotfill mode")
    for col in ("coalescing interval", "out tok/s", "x slotfill", "deltas/job", "tokens/delta",
                "Redis commands/job", "free-slot steps"):
        t.add_column(col, justify="right")
    sf = modes.get("slotfill", {})
    t.add_row("(not streaming)", _num(sf.get("output_tok_s")), "1.000", "–", "–",
              _num((sf.get("redis") or {}).get("commands_per_job"), "{:.2f}"),
              _num((sf.get("slot_idle") or {}).get("free_slot_share"), "{:.2%}"))
    for name, m in rows:
        st = m.get("stream") or {}
        t.add_row(f"{name[len('stream@'):]} ms", _num(m.get("output_tok_s")),
                  _num(m.get("ratio_to_slotfill"), "{:.3f}"),
                  _num(st.get("deltas_per_job"), "{:.1f}"),
                  _num(st.get("tokens_per_delta"), "{:.1f}"),
                  _num((m.get("redis") or {}).get("commands_per_job"), "{:.2f}"),
                  _num((m.get("slot_idle") or {}).get("free_slot_share"), "{:.2%}"))
    return t


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The design targets, each with the measured value and whether it was met."""
    modes = results.get("modes", {})
    gpu = results.get("meta", {}).get("gpu") is not None
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, value: Any, target: str, ok: bool | None) -> None:
        out[name] = {"value": value, "target": target, "met": ok}

    sf = modes.get("slotfill", {})
    ratio = sf.get("ratio_to_offline")
    want = 0.99 if gpu else 0.97
    put("slotfill / offline (output tok/s)", ratio, f">= {want}",
        None if ratio is None else ratio >= want)
    share = (sf.get("slot_idle") or {}).get("free_slot_share")
    put("slotfill free-slot steps while jobs wait", share, "<= 0.5 %",
        None if share is None else share <= 0.005)
    p99 = (sf.get("refill") or {}).get("p99_ms")
    put("slotfill refill latency p99 (ms)", p99, "<= 2 ms", None if p99 is None else p99 <= 2)
    for name, m in modes.items():
        if "scaling" in m:
            put(f"{name} scaling: out tok/s / ({len(m['workers'])} x offline)", m["scaling"],
                ">= 0.98", None if m["scaling"] is None else m["scaling"] >= 0.98)
        if m.get("scaling_vs_split") is not None:
            put(f"{name}: out tok/s / offline_split (one engine per GPU, each its share)",
                m["scaling_vs_split"], ">= 0.98", m["scaling_vs_split"] >= 0.98)
    cel = modes.get("celery_per_request", {}).get("output_tok_s")
    x = sf["output_tok_s"] / cel if cel and sf.get("output_tok_s") else None
    put("slotfill / celery per-request (tok/s)", x, ">= 10x", None if x is None else x >= 10)
    sub = results.get("submit") or {}
    sm = sub.get("submit_many_jobs_s")
    put("submit_many jobs/s (one client)", sm, ">= 20000", None if sm is None else sm >= 20_000)
    depths = sub.get("depths") or {}
    if "empty" in depths and "deep" in depths:
        a, b = depths["empty"]["commands_per_job"], depths["deep"]["commands_per_job"]
        put("submit Redis commands/job, empty vs deep queue", [a, b], "equal",
            abs(a - b) <= 0.02 * a)
    soak = results.get("soak") or {}
    if soak.get("rss_mib"):
        rss = soak["rss_mib"]
        warm = rss.get("warm", rss.get("start"))
        growth = soak.get("rss_growth_after_warmup_mib")
        put(f"soak worker RSS (MiB) warm -> end, {soak['jobs']:,} jobs", [warm, rss["end"]],
            "flat (<= 5 % growth)", None if growth is None else growth <= 0.05 * warm)
    return out


def mode_table(results: dict[str, Any]) -> Table:
    t = Table(title="python -m bench: one workload, one engine configuration, each mode",
              show_lines=False)
    for col in ("mode", "done/exact", "out tok/s", "x offline", "req/s", "TTFT p50/p99 ms",
                "E2E p50/p99 ms", "queue wait p50/p99 ms", "mean occ.", "free-slot steps",
                "refill p50/p99 ms", "startup s"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for name, m in results.get("modes", {}).items():
        label = MODE_LABELS.get(name, name)
        if "error" in m:
            t.add_row(label, "[red]failed[/red]", *["–"] * 9, m.get("error", "")[:30])
            continue
        idle = m.get("slot_idle") or {}
        refill = m.get("refill") or {}
        share = idle.get("free_slot_share")
        t.add_row(
            label,
            f"{m['completed']}/{m['exact_token_counts']} of {m['requests']}",
            _num(m["output_tok_s"]),
            _num(m.get("ratio_to_offline"), "{:.3f}"),
            _num(m["req_s"], "{:,.1f}"),
            _pair(m["ttft_p50_ms"], m["ttft_p99_ms"]),
            _pair(m["e2e_p50_ms"], m["e2e_p99_ms"]),
            _pair(m["queue_wait_p50_ms"], m["queue_wait_p99_ms"]),
            _num(None if m.get("mean_occupancy") is None else 100 * m["mean_occupancy"],
                 "{:.1f} %"),
            _num(None if share is None else 100 * share, "{:.2f} %"),
            _pair(refill.get("p50_ms"), refill.get("p99_ms"), "{:,.2f}") if refill else "–",
            _num(m.get("startup_s"), "{:.0f}"),
        )
    return t


def engine_table(results: dict[str, Any]) -> Table:
    """Why throughput differs: steps, tokens per step, step time, and CPU outside the engine."""
    t = Table(title="engine steps and CPU seconds in the measured window")
    for col in ("mode", "steps", "tokens/step", "full-step ms mean/p50", "CPU s engine",
                "frontend", "redis", "client"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for name, m in results.get("modes", {}).items():
        if "error" in m:
            continue
        fs = m.get("full_step_ms") or {}
        c = m.get("cpu_s") or {}
        t.add_row(MODE_LABELS.get(name, name), _num(m.get("engine_steps")),
                  _num(m.get("tokens_per_step"), "{:.1f}"),
                  _pair(fs.get("mean"), fs.get("p50"), "{:.2f}"),
                  _num(c.get("engine"), "{:.1f}"), _num(c.get("frontend"), "{:.1f}"),
                  _num(c.get("redis"), "{:.1f}"), _num(c.get("client"), "{:.1f}"))
    return t


def repeats_table(results: dict[str, Any]) -> Table | None:
    modes = {k: v for k, v in results.get("modes", {}).items() if v.get("repeats")}
    if not modes:
        return None
    t = Table(title="repeats (the table above shows each mode's median run)")
    t.add_column("mode")
    t.add_column("out tok/s per run", justify="right")
    t.add_column("full-step p50 ms per run", justify="right")
    for name, m in modes.items():
        reps = m["repeats"]
        t.add_row(MODE_LABELS.get(name, name),
                  " · ".join(_num(r.get("output_tok_s")) for r in reps),
                  " · ".join(_num(r.get("full_step_p50_ms"), "{:.2f}") for r in reps))
    return t


def redis_table(results: dict[str, Any]) -> Table | None:
    sub = results.get("submit")
    sf = results.get("modes", {}).get("slotfill", {})
    soak = results.get("soak")
    if not (sub or sf.get("redis") or soak):
        return None
    t = Table(title="Redis: submit throughput, commands per job, soak")
    t.add_column("what")
    t.add_column("value", justify="right")
    if sub:
        t.add_row("submit one by one (jobs/s)", _num(sub.get("submit_jobs_s")))
        t.add_row("submit_many, pipelined (jobs/s)", _num(sub.get("submit_many_jobs_s")))
        for d in (sub.get("depths") or {}).values():
            t.add_row(f"submit: commands/job, queue depth {d['depth_before']:,}",
                      f"{d['commands_per_job']:.3f} ({d['script_calls_per_job']:.3f} scripts; "
                      f"{_num(d['submit_many_jobs_s'])} jobs/s)")
    if sf.get("redis"):
        d = sf["redis"]
        t.add_row("slotfill run: commands/job, whole lifecycle",
                  f"{d['commands_per_job']:.2f} ({d['script_calls_per_job']:.2f} scripts)")
    if soak:
        for name, d in (soak.get("redis_per_job") or {}).items():
            t.add_row(f"soak, worker side: commands/job while {name} (depth "
                      f"{d['queue_depth'][0]:,}→{d['queue_depth'][1]:,})",
                      f"{d['commands_per_job']:.2f} ({d['script_calls_per_job']:.2f} scripts)")
        rss = soak["rss_mib"]
        t.add_row(f"soak: {soak['jobs']:,} jobs, {soak['jobs_s']:,.0f} jobs/s, worker RSS MiB",
                  f"start {rss.get('start')} · warm {rss.get('warm')} · end {rss.get('end')} · "
                  f"peak {rss.get('peak')}")
    return t


def fleet_table(results: dict[str, Any]) -> Table | None:
    """Fleet modes: how the work split between the workers, and what each engine saw."""
    fleets = {k: v for k, v in results.get("modes", {}).items() if v.get("workers")}
    if not fleets:
        return None
    t = Table(title="fleet: each worker's share and engine (free-slot steps until the last "
                    "job left Redis; pulled → first token = held before the engine ran it)")
    for col in ("mode", "worker", "jobs", "out tokens", "prompt tokens", "long prompts",
                "mean occ.", "free-slot steps", "pulled→1st tok p50/p99/max ms",
                "last finish s"):
        t.add_column(col, justify="left" if col in ("mode", "worker") else "right")
    pc = "{:.1%}"
    for name, m in fleets.items():
        for w, d in m["workers"].items():
            held = d["pulled_to_first_token_ms"]
            t.add_row(MODE_LABELS.get(name, name), w, f"{d['jobs']} ({_num(d['jobs_share'], pc)})",
                      _num(d["output_tokens_share"], pc), _num(d["prompt_tokens_share"], pc),
                      f"{d['long_prompts']} ({_num(d['long_prompts_share'], pc)})",
                      _num(d["mean_occupancy"], pc), _num(d["free_slot_share"], "{:.2%}"),
                      " / ".join(_num(held[k]) for k in ("p50", "p99", "max")),
                      _num(d["last_finish_s"], "{:.1f}"))
    return t


def target_table(tg: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="targets")
    t.add_column("target")
    t.add_column("measured", justify="right")
    t.add_column("wanted", justify="right")
    t.add_column("met")
    for name, d in tg.items():
        v = d["value"]
        if isinstance(v, float):
            shown = f"{100 * v:.2f} %" if "%" in d["target"] else f"{v:,.3f}"
        elif isinstance(v, list):
            shown = " → ".join(_num(x, "{:,.2f}") for x in v)
        else:
            shown = _num(v, "{}")
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "–"}[d["met"]]
        t.add_row(name, shown, d["target"], met)
    return t


def print_report(results: dict[str, Any], console: Console) -> None:
    console.print(mode_table(results))
    console.print(engine_table(results))
    ft = fleet_table(results)
    if ft is not None:
        console.print(ft)
    st = stream_table(results)
    if st is not None:
        console.print(st)
    rep = repeats_table(results)
    if rep is not None:
        console.print(rep)
    rt = redis_table(results)
    if rt is not None:
        console.print(rt)
    console.print(target_table(results.get("targets", {})))
    files = results.get("files", {})
    if files:
        console.print(f"JSON: {files.get('json')}  plot: {files.get('png')}")


def plot(results: dict[str, Any], path: Path) -> None:
    """Engine occupancy (running requests) over time, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = {k: v for k, v in results.get("modes", {}).items() if v.get("occupancy")}
    if not modes:
        return
    slots = results["config"]["engine"]["max_num_seqs"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 2.3 * len(modes)), squeeze=False)
    for ax, (name, m) in zip(axes[:, 0], modes.items(), strict=True):
        xs, ys = m["occupancy"]
        ax.step(xs, ys, where="post", color="tab:blue", linewidth=0.8)
        ax.fill_between(xs, ys, step="post", alpha=0.3, color="tab:blue")
        ax.axhline(slots, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_ylim(0, slots * 1.15)
        ax.set_xlim(0, max(xs[-1], 1e-3))
        ratio = m.get("ratio_to_offline")
        occ = m.get("mean_occupancy")
        ax.set_title(f"{MODE_LABELS.get(name, name)}: {m['output_tok_s']:,.0f} out tok/s"
                     + (f" ({ratio:.2f}x offline)" if ratio else "")
                     + (f", mean occupancy {100 * occ:.0f} %" if occ is not None else "")
                     + f", {m['completed']} requests", fontsize=9)
        ax.set_ylabel("running")
    axes[-1, 0].set_xlabel("seconds since the first submit")
    meta = results.get("meta", {})
    fig.suptitle(f"engine occupancy (dashed: max_num_seqs={slots}) — {meta.get('device', '')}",
                 fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def save_png(fig: Any, path: Path) -> None:
    """A committed plot: 90 dpi and a 64-colour palette (a few lines and fills need no more;
    a quarter of the size of full colour)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=64).save(path, optimize=True)


SERIES_KEYS = {"occupancy"}
"""Per-mode keys holding series (moved out of the summary)."""


def files_for(prefix: Path, results_dir: Path) -> dict[str, str]:
    """Where a run's summary, plot and series go."""
    return {"json": str(prefix.with_suffix(".json")), "png": str(prefix.with_suffix(".png")),
            "series": str(results_dir / "raw" / f"{prefix.name}.series.json")}


def split_series(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, series): the results without their series, and the series alone."""
    series: dict[str, Any] = {"modes": {}}
    modes = {}
    for name, m in results.get("modes", {}).items():
        modes[name] = {k: v for k, v in m.items() if k not in SERIES_KEYS}
        got = {k: m[k] for k in SERIES_KEYS if m.get(k) is not None}
        if got:
            series["modes"][name] = got
    summary = {**results, "modes": modes}
    soak = results.get("soak")
    if isinstance(soak, dict) and "rss_samples" in soak:
        summary["soak"] = {k: v for k, v in soak.items() if k != "rss_samples"}
        series["soak_rss_samples"] = soak["rss_samples"]
    return summary, series


def write_results(results: dict[str, Any]) -> None:
    """The summary, the series and the plot, to ``results["files"]``."""
    files = results["files"]
    summary, series = split_series(results)
    Path(files["json"]).parent.mkdir(parents=True, exist_ok=True)
    Path(files["json"]).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if "series" in files:
        Path(files["series"]).parent.mkdir(parents=True, exist_ok=True)
        Path(files["series"]).write_text(json.dumps(series, default=str))
    plot(results, Path(files["png"]))


def load_results(path: Path) -> dict[str, Any]:
    """A summary with its series put back where they were (when its series file is here)."""
    data: dict[str, Any] = json.loads(path.read_text())
    series_path = (data.get("files") or {}).get("series")
    if series_path and Path(series_path).exists():
        series = json.loads(Path(series_path).read_text())
        for name, got in series.get("modes", {}).items():
            if name in data.get("modes", {}):
                data["modes"][name].update(got)
        if "soak_rss_samples" in series and isinstance(data.get("soak"), dict):
            data["soak"]["rss_samples"] = series["soak_rss_samples"]
    return data
