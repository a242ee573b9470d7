"""``python -m bench latency``: latency under live load, slotfill next to ``vllm serve``.

1. The engine's capacity in requests/s: ``offline`` mode (``LLM.generate`` over the first
   ``capacity_requests`` requests of the seeded mix, in a fresh process), unless given.
2. Per system, one engine start, a warm-up (not measured), then one open-loop level per
   fraction of that capacity (Poisson arrivals, bench/arrivals.py) and a burst; each level
   waits for its requests to end (its drain) before the next starts.
   Systems, one engine at a time: ``serve`` (vLLM's OpenAI server, live_serve.py),
   ``slotfill`` (client → Redis → worker, live_slotfill.py) and ``gateway`` (slotfill's
   HTTP front door on the same worker, live_gateway.py).
3. Figures per level (bench/latency_report.py), ratios to serve's, the table, the plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import latency_report
from bench.arrivals import Level, levels
from bench.config import BenchConfig, engine_env, model_vocab_size, resolve_model
from bench.modes.openloop import Send, drive
from bench.workload import Request, make_workload

Say = Callable[[str], None]


@dataclass
class LiveConfig:
    """What one live-load run offers each system."""

    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9, 1.0, 1.2])
    seconds: float = 20.0
    """Length of each level's arrivals (its requests: rate x seconds)."""
    burst_fraction: float = 2.0
    """The burst's rate / capacity (0 = no burst)."""
    burst_seconds: float = 10.0
    systems: list[str] = field(default_factory=lambda: list(latency_report.SYSTEMS))
    capacity: float = 0.0
    """Requests/s the fractions refer to; 0 = measure it (offline mode)."""
    capacity_requests: int = 200
    warmup: int = 16
    """Requests sent at once to each system before its first level (not measured)."""
    drain_timeout: float = 180.0
    """After a level's last arrival, how long its requests may take to end (then: lost)."""
    pause: float = 2.0
    """Idle seconds between levels."""
    seed: int = 0
    interleave: bool = False
    """Start every system at once (idle ones wait on a socket) and run the levels level by
    level, each against every system in turn: on a shared box whose load drifts, each level's
    figures are then taken under much the same load. Needs memory for every engine at once
    (fine for the tiny CPU model; on a GPU each would need its own share of memory)."""


def measure_capacity(cfg: BenchConfig, run_dir: Path, n: int, say: Say) -> dict[str, float]:
    """Offline requests/s and output tokens/s over the mix's first ``n`` requests."""
    from bench.modes.inproc import run_inproc

    cap_dir = run_dir / "capacity"
    cap_dir.mkdir(parents=True, exist_ok=True)
    c = replace(cfg, workload=replace(cfg.workload, requests=n), run_dir=str(cap_dir))
    c.save(cap_dir / "config.json")
    say(f"capacity: offline LLM.generate over {n} requests")
    raw = run_inproc("offline", cap_dir, lambda *_: None, n)
    wall = raw["t_end"] - raw["t_start"]
    tokens = sum(r["output_tokens"] for r in raw["records"])
    return {"rps": len(raw["records"]) / wall, "out_tok_s": tokens / wall, "wall_s": wall,
            "startup_s": raw["startup_s"], "requests": n}


@dataclass
class Target:
    """One system as the driver sees it: how to send, and (serve) its queue-time counters."""

    name: str
    send: Send
    metrics: Callable[[], tuple[float, float]] | None = None


async def _one_level(t: Target, lv: Level, reqs: list[Request], live: LiveConfig, say: Say
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One level against one system: its summary and its raw samples."""
    before = await asyncio.to_thread(t.metrics) if t.metrics else None
    run = await drive(reqs[:len(lv.arrivals)], lv.arrivals, t.send, live.drain_timeout)
    summary = latency_report.summarize(run, lv.name, lv.rate, lv.arrivals[-1])
    summary["load_1m"] = os.getloadavg()[0]
    if t.metrics and before:
        after = await asyncio.to_thread(t.metrics)
        n = after[1] - before[1]
        summary["queue_wait_ms"]["mean"] = (round(1000 * (after[0] - before[0]) / n, 2)
                                            if n else None)
    say(f"{t.name} {lv.name}: offered {lv.rate:.2f} achieved {summary['achieved_rps']} "
        f"req/s, TTFT p50/p99 {summary['ttft_ms']['p50']}/{summary['ttft_ms']['p99']} ms, "
        f"E2E p99 {summary['e2e_ms']['p99']} ms, ok {summary['ok']}/{summary['requests']}, "
        f"load {summary['load_1m']:.1f}")
    raw = {"t0": run.t0, "samples": [s.to_dict() for s in run.samples],
           "in_flight": run.in_flight}
    return summary, raw


async def _targets(bases: dict[str, str], redis_url: str, w: Any, live: LiveConfig,
                   stack: contextlib.AsyncExitStack) -> dict[str, Target]:
    import aiohttp

    from bench.modes import live_gateway, live_serve, live_slotfill

    http = await stack.enter_async_context(
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
    out = {}
    for name in live.systems:
        if name == "serve":
            base = bases["serve"]
            out[name] = Target(name, live_serve.sender(http, base, live.drain_timeout),
                               lambda base=base: live_serve.queue_time(base))  # type: ignore[misc]
        elif name == "slotfill":
            client = live_slotfill.client(redis_url)
            stack.push_async_callback(client.close)
            out[name] = Target(name, live_slotfill.sender(client, w, live.drain_timeout))
        elif name == "gateway":
            out[name] = Target(name, live_gateway.sender(http, bases["gateway"],
                                                         live.drain_timeout))
    return out


async def _levels(systems: list[str], bases: dict[str, str], redis_url: str, w: Any,
                  lvls: list[Level], reqs: list[Request], live: LiveConfig, say: Say,
                  interleave: bool) -> dict[str, dict[str, Any]]:
    """Every level against each of ``systems``: all of one system's levels, then the next's;
    or (``interleave``) level by level, the systems' order rotating from level to level, so
    a change in the box's load falls on every system alike."""
    async with contextlib.AsyncExitStack() as stack:
        targets = await _targets(bases, redis_url, w, replace(live, systems=systems), stack)
        warm = reqs[:live.warmup]
        for t in targets.values():
            if warm:
                await drive(warm, [0.0] * len(warm), t.send, live.drain_timeout)
        out: dict[str, dict[str, Any]] = {s: {"levels": [], "raw": {}} for s in targets}
        names = list(targets)
        plan = ([(lv, names[(k + i) % len(names)]) for k, lv in enumerate(lvls)
                 for i in range(len(names))] if interleave
                else [(lv, name) for name in names for lv in lvls])
        for lv, name in plan:
            summary, raw = await _one_level(targets[name], lv, reqs, live, say)
            out[name]["levels"].append(summary)
            out[name]["raw"][lv.name] = raw
            await asyncio.sleep(live.pause)
        return out


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def run_stacks(systems: list[str], cfg: BenchConfig, lvls: list[Level],
               reqs: list[Request], live: LiveConfig, run_dir: Path, redis_url: str,
               say: Say, interleave: bool = False) -> dict[str, dict[str, Any]]:
    """Start what ``systems`` need (serve's server; one worker for slotfill and gateway, the
    gateway in front of it), run the levels, stop them; returns each system's results."""
    from bench.modes import live_gateway, live_serve, live_slotfill

    starts: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        bases: dict[str, str] = {}
        w = None
        t = time.time()
        if "serve" in systems:
            bases["serve"] = stack.enter_context(live_serve.server(cfg, run_dir))
            starts["serve"] = time.time() - t
            say(f"serve: server ready after {starts['serve']:.0f} s")
        if {"slotfill", "gateway"} & set(systems):
            t = time.time()
            w = stack.enter_context(live_slotfill.worker(cfg, redis_url, run_dir))
            starts["slotfill"] = starts["gateway"] = time.time() - t
            say(f"slotfill: worker ready after {starts['slotfill']:.0f} s")
        if "gateway" in systems:
            bases["gateway"] = stack.enter_context(live_gateway.gateway(redis_url, run_dir))
        load = _uptime()
        got = asyncio.run(_levels(systems, bases, redis_url, w, lvls, reqs, live, say,
                                  interleave))
    for name, res in got.items():
        (run_dir / f"{name}.samples.json").write_text(json.dumps(res.pop("raw")))
        res.update(startup_s=round(starts[name], 1), loadavg_before=load,
                   loadavg_after=_uptime(), interleaved=interleave)
    return got


def run_live(cfg: BenchConfig, live: LiveConfig, results_dir: Path, out_prefix: str | None,
             argv: list[str], say: Say, redis_boost: bool = True) -> dict[str, Any]:
    """The whole run; writes the summary JSON, the plot and the table (``PREFIX.md``)."""
    from bench.redis_server import bench_redis, scheduling
    from bench.runner import meta

    engine_env()
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    run_dir = (results_dir / "raw" / f"latency-{stamp}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(cfg.engine)
    # Absolute, so no server reads a relative directory as a Hugging Face model name.
    cfg.model_path = str(Path(model).resolve()) if Path(model).is_dir() else model
    cfg.run_dir = str(run_dir)
    vocab = cfg.workload.vocab_size or model_vocab_size(cfg.model_path)
    cfg.workload = replace(cfg.workload, vocab_size=vocab)
    results: dict[str, Any] = {"meta": {**meta(["latency", *argv]), "loadavg_start": _uptime()},
                               "config": asdict(cfg), "live": asdict(live), "systems": {}}
    if live.capacity:
        results["capacity"] = {"given": live.capacity}
    else:
        results["capacity"] = measure_capacity(cfg, run_dir, live.capacity_requests, say)
    capacity = live.capacity or results["capacity"]["rps"]
    results["capacity_rps"] = capacity
    say(f"capacity {capacity:.2f} req/s")
    lvls = levels(capacity, live.fractions, live.seconds, live.seed, live.burst_fraction,
                  live.burst_seconds)
    n = max(live.warmup, *(len(lv.arrivals) for lv in lvls))
    reqs = make_workload(replace(cfg.workload, requests=n), vocab)
    (run_dir / "redis").mkdir(exist_ok=True)
    prefix = Path(out_prefix) if out_prefix else results_dir / f"latency-{stamp}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with bench_redis(str(run_dir / "redis"), redis_boost) as server:
        results["meta"]["redis_scheduling"] = scheduling(server)
        # Interleaved: every system up at once (the CPU box); else one engine at a time.
        groups = ([live.systems] if live.interleave else
                  [g for g in (["serve"], [s for s in live.systems if s != "serve"])
                   if set(g) & set(live.systems)])
        for group in groups:
            results["systems"].update(run_stacks(
                [s for s in group if s in live.systems], cfg, lvls, reqs, live, run_dir,
                server.url, say, live.interleave))
            write(results, prefix)  # what is done survives a later failure or timeout
    results["meta"]["loadavg_end"] = _uptime()
    write(results, prefix)
    say(f"wrote {prefix}.json, .md, .png; raw samples in {run_dir}")
    return results


def write(results: dict[str, Any], prefix: Path) -> None:
    """The summary ``PREFIX.json``, the table ``PREFIX.md`` and the plot ``PREFIX.png``."""
    latency_report.ratios(results)
    Path(f"{prefix}.json").write_text(json.dumps(results, indent=1))
    Path(f"{prefix}.md").write_text(latency_report.markdown_table(results) + "\n")
    with contextlib.suppress(ImportError):  # matplotlib is in the bench extra
        latency_report.plot(results, Path(f"{prefix}.png"))
