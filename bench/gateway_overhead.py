"""What the OpenAI-compatible gateway adds over slotfill's Python client.

``python -m bench.gateway_overhead [--jobs 400] [--concurrency 1,32]``: one redis-server, one
simulated-engine worker (many slots, short jobs, so the engine is not what limits), and one
``slotfill gateway`` process. The same jobs run twice per concurrency: through
``AsyncClient.submit`` + ``wait`` (direct), then through the ``openai`` SDK's
``chat.completions.create`` against the gateway. Reported: jobs/s and end-to-end latency
percentiles of each, and the difference (what the HTTP hop, the SDK and the gateway's own
Redis calls add), and the gateway process's CPU per request (psutil): on a machine with cores
to spare, that figure says how many requests one gateway process serves. Standalone: not
part of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import openai
import psutil  # type: ignore[import-untyped]

from producer import AsyncClient
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.redis_server import RedisServer, free_port

QUEUE = "gw-bench"
MESSAGES = [{"role": "user", "content": "benchmark"}]


async def _run(n: int, concurrency: int, one: Callable[[], Awaitable[None]]
               ) -> tuple[float, list[float]]:
    """(jobs/s, per-request latencies in seconds) of ``n`` calls, ``concurrency`` at once."""
    latencies: list[float] = []
    todo = iter(range(n))

    async def lane() -> None:
        for _ in todo:
            t = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return n / (time.perf_counter() - start), latencies


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 \
        else xs[0]


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def measure(redis_url: str, base_url: str, jobs: int, concurrency: int,
                  max_tokens: int, gateway: psutil.Process
                  ) -> dict[str, tuple[float, list[float], float]]:
    """Per path: jobs/s, latencies, and the gateway process's CPU seconds per request."""
    direct = AsyncClient.from_url(redis_url, queue=QUEUE)
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    # The raw HTTP path separates the gateway's own cost from the SDK's (both run here).
    # aiohttp, not httpx: httpx's pool (and httpx2's, under the SDK) adds tens to hundreds of
    # ms per request from ~32 concurrent requests on (seen here), which would be billed to
    # the gateway. aiohttp comes with vLLM.
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4))

    async def via_client() -> None:
        job = await direct.submit(messages=MESSAGES, max_tokens=max_tokens)
        res = await direct.wait(job.id, timeout=60)
        assert res.ok

    async def via_sdk() -> None:
        out = await sdk.chat.completions.create(model="sim", messages=MESSAGES,  # type: ignore[arg-type]
                                                max_tokens=max_tokens)
        assert out.choices[0].finish_reason == "length"

    body = {"model": "sim", "messages": MESSAGES, "max_tokens": max_tokens}

    async def via_http() -> None:
        async with http.post(base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    paths = {"client": via_client, "gateway, aiohttp": via_http, "gateway, openai SDK": via_sdk}
    warm = max(10, concurrency)
    for one in paths.values():
        await _run(warm, concurrency, one)
    out = {}
    for name, one in paths.items():
        before = cpu_s(gateway)
        rate, lat = await _run(jobs, concurrency, one)
        out[name] = (rate, lat, (cpu_s(gateway) - before) / jobs)
    await sdk.close()
    await http.close()
    await direct.close()
    return out


def start_gateway(redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SLOTFILL_REDIS_URL": redis_url, "SLOTFILL_QUEUE": QUEUE,
           "SLOTFILL_GATEWAY_PORT": str(port)}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "slotfill", "gateway"], env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"gateway did not start: {log.read_text()}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--step-ms", type=float, default=1.0)
    args = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    (wd / "redis").mkdir()
    with RedisServer(workdir=str(wd / "redis")) as server:
        worker = WorkerProcess(server.url, "bench-sim", wd / "worker.log", queue=QUEUE,
                               engine="sim", sim_step_ms=args.step_ms, max_num_seqs=128,
                               headroom=32, log_job_events="false").start()
        port = free_port()
        gateway = start_gateway(server.url, port, wd / "gateway.log")
        try:
            worker.wait_ready(60)
            print(f"{args.jobs} jobs of {args.max_tokens} tokens, sim step {args.step_ms} ms")
            print("| concurrency | path | jobs/s | p50 ms | p99 ms | gateway CPU ms/request |")
            print("|---|---|---|---|---|---|")
            for conc in (int(c) for c in args.concurrency.split(",")):
                got = asyncio.run(measure(server.url, f"http://127.0.0.1:{port}/v1",
                                          args.jobs, conc, args.max_tokens,
                                          psutil.Process(gateway.pid)))
                for path, (rate, lat, cpu) in got.items():
                    print(f"| {conc} | {path} | {rate:.0f} | {1000 * pct(lat, 50):.1f} | "
                          f"{1000 * pct(lat, 99):.1f} | {1000 * cpu:.2f} |")
                a = got["client"][1]
                for path in ("gateway, aiohttp", "gateway, openai SDK"):
                    b = got[path][1]
                    print(f"| {conc} | added: {path} | | {1000 * (pct(b, 50) - pct(a, 50)):+.1f} "
                          f"| {1000 * (pct(b, 99) - pct(a, 99)):+.1f} | |")
        finally:
            gateway.terminate()
            gateway.wait(10)
            worker.stop(20)


if __name__ == "__main__":
    main()
