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


async def _run_levels(system: str, send: Send, lvls: list[Level], reqs: list[Request],
                      live: LiveConfig, say: Say, metrics: Callable[[], tuple[float, float]]
                      | None, samples_out: Path) -> list[dict[str, Any]]:
    warm = reqs[:live.warmup]
    if warm:
        await drive(warm, [0.0] * len(warm), send, live.drain_timeout)
    out, raw = [], {}
    for lv in lvls:
        before = await asyncio.to_thread(metrics) if metrics else None
        run = await drive(reqs[:len(lv.arrivals)], lv.arrivals, send, live.drain_timeout)
        summary = latency_report.summarize(run, lv.name, lv.rate, lv.arrivals[-1])
        summary["load_1m"] = os.getloadavg()[0]
        if metrics and before:
            after = await asyncio.to_thread(metrics)
            n = after[1] - before[1]
            summary["queue_wait_ms"]["mean"] = (round(1000 * (after[0] - before[0]) / n, 2)
                                                if n else None)
        out.append(summary)
        raw[lv.name] = {"t0": run.t0, "samples": [s.to_dict() for s in run.samples],
                        "in_flight": run.in_flight}
        say(f"{system} {lv.name}: offered {lv.rate:.2f} achieved {summary['achieved_rps']} "
            f"req/s, TTFT p50/p99 {summary['ttft_ms']['p50']}/{summary['ttft_ms']['p99']} ms, "
            f"E2E p99 {summary['e2e_ms']['p99']} ms, ok {summary['ok']}/{summary['requests']}, "
            f"load {summary['load_1m']:.1f}")
        await asyncio.sleep(live.pause)
    await asyncio.to_thread(samples_out.write_text, json.dumps(raw))
    return out


async def _serve(cfg: BenchConfig, base: str, lvls: list[Level], reqs: list[Request],
                 live: LiveConfig, say: Say, out: Path) -> list[dict[str, Any]]:
    import aiohttp

    from bench.modes import live_serve

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        send = live_serve.sender(http, base, live.drain_timeout)
        return await _run_levels("serve", send, lvls, reqs, live, say,
                                 lambda: live_serve.queue_time(base), out)


async def _slotfill(redis_url: str, w: Any, lvls: list[Level], reqs: list[Request],
                    live: LiveConfig, say: Say, out: Path) -> list[dict[str, Any]]:
    from bench.modes import live_slotfill
    from producer import AsyncClient

    client = AsyncClient.from_url(redis_url, queue=live_slotfill.QUEUE)
    try:
        send = live_slotfill.sender(client, w, live.drain_timeout)
        return await _run_levels("slotfill", send, lvls, reqs, live, say, None, out)
    finally:
        await client.close()


async def _gateway(base: str, lvls: list[Level], reqs: list[Request], live: LiveConfig,
                   say: Say, out: Path) -> list[dict[str, Any]]:
    import aiohttp

    from bench.modes import live_gateway

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        send = live_gateway.sender(http, base, live.drain_timeout)
        return await _run_levels("gateway", send, lvls, reqs, live, say, None, out)


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def run_system(system: str, cfg: BenchConfig, lvls: list[Level], reqs: list[Request],
               live: LiveConfig, run_dir: Path, redis_url: str, say: Say
               ) -> dict[str, dict[str, Any]]:
    """One engine start for ``serve``, or one worker for ``slotfill`` and ``gateway`` (both
    run on it, one after the other, when both are chosen); returns their results."""
    from bench.modes import live_gateway, live_serve, live_slotfill

    out: dict[str, dict[str, Any]] = {}
    t = time.time()
    if system == "serve":
        with live_serve.server(cfg, run_dir) as base:
            start = time.time() - t
            say(f"serve: server ready after {start:.0f} s")
            load = _uptime()
            lv = asyncio.run(_serve(cfg, base, lvls, reqs, live, say,
                                    run_dir / "serve.samples.json"))
            out["serve"] = {"startup_s": start, "loadavg_before": load,
                            "loadavg_after": _uptime(), "levels": lv}
        return out
    with live_slotfill.worker(cfg, redis_url, run_dir) as w:
        start = time.time() - t
        say(f"slotfill: worker ready after {start:.0f} s")
        if "slotfill" in live.systems:
            load = _uptime()
            lv = asyncio.run(_slotfill(redis_url, w, lvls, reqs, live, say,
                                       run_dir / "slotfill.samples.json"))
            out["slotfill"] = {"startup_s": start, "loadavg_before": load,
                               "loadavg_after": _uptime(), "levels": lv}
        if "gateway" in live.systems:
            with live_gateway.gateway(redis_url, run_dir) as base:
                load = _uptime()
                lv = asyncio.run(_gateway(base, lvls, reqs, live, say,
                                          run_dir / "gateway.samples.json"))
                out["gateway"] = {"startup_s": start, "loadavg_before": load,
                                  "loadavg_after": _uptime(), "levels": lv}
    return out


def run_live(cfg: BenchConfig, live: LiveConfig, results_dir: Path, out_prefix: str | None,
             argv: list[str], say: Say, redis_boost: bool = True) -> dict[str, Any]:
    """The whole run; writes the summary JSON, the plot and the table (``PREFIX.md``)."""
    from bench.redis_server import bench_redis, scheduling
    from bench.runner import meta

    engine_env()
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    run_dir = results_dir / "raw" / f"latency-{stamp}"
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
        for system in ("serve", "slotfill"):
            if system in live.systems or (system == "slotfill" and "gateway" in live.systems):
                results["systems"].update(
                    run_system(system, cfg, lvls, reqs, live, run_dir, server.url, say))
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
