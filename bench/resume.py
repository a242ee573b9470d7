"""Issue 15's figures on the simulated engine: what checkpoints cost Redis per job, and what a
kill costs with them (resume) and without them (restart).

``python -m bench.resume cost``: jobs run on an in-process worker per checkpoint interval;
Redis commands (``INFO commandstats``, Lua's inner commands included), bytes the workers sent
(``total_net_input_bytes``) and round trips of the token writer, per job.

``python -m bench.resume kill``: one long job on a worker process (``--engine sim`` or the
real tiny ``vllm``), SIGKILLed at a share of its tokens; a peer (already up) finishes it.
Per kill: engine tokens wasted (both engines' step logs, less ``max_tokens``) and time from
the kill to the result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.redis_stats import command_calls, delta
from producer import Client, ClientSettings, QueueKeys
from slotfill.testing.fleet import WorkerProcess
from slotfill.testing.inproc import InprocWorker
from slotfill.testing.poll import wait_until
from slotfill.testing.redis_server import RedisServer

SIM: dict[str, str | int | float] = dict(
    engine="sim", max_num_seqs=16, headroom=0, lease_seconds=2, heartbeat_seconds=0.5,
    max_model_len=8192)


def _cost(url: str, r: redis.Redis, interval_ms: float, stream: bool, jobs: int,
          tokens: int, step_ms: float) -> dict[str, Any]:
    queue = f"cost{int(interval_ms)}{int(stream)}"
    client = Client(redis.Redis.from_url(url), ClientSettings(queue=queue))
    with InprocWorker(url, "w", queue=queue, sim_step_ms=step_ms,
                      checkpoint_interval_ms=interval_ms, **SIM) as w:
        w.wait_ready()
        before, net0 = command_calls(r), r.info("stats")["total_net_input_bytes"]
        ids = [client.submit("hello world", max_tokens=tokens, stream=stream).id
               for _ in range(jobs)]
        for job_id in ids:
            client.wait(job_id, timeout=300)
        d = delta(before, command_calls(r))
        net = r.info("stats")["total_net_input_bytes"] - net0
    ckpt = sum(r.strlen(QueueKeys.for_queue(queue).checkpoint(j)) for j in ids)
    return {"interval_ms": interval_ms, "stream": stream, "jobs": jobs, "tokens": tokens,
            "commands_per_job": round(sum(d.values()) / jobs, 1),
            "scripts_per_job": round((d.get("evalsha", 0) + d.get("eval", 0)) / jobs, 1),
            "append_per_job": round(d.get("append", 0) / jobs, 1),
            "bytes_in_per_job": round(net / jobs), "checkpoint_bytes_per_job": ckpt // jobs}


def cost(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(workdir=tmp)
        server.start()
        try:
            r = redis.Redis.from_url(server.url)
            for stream in (False, True):
                for interval in args.intervals:
                    print(json.dumps(_cost(server.url, r, interval, stream, args.jobs,
                                           args.tokens, args.step_ms)), flush=True)
        finally:
            server.stop()


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x or "")


def _engine_tokens(log: Path) -> int:
    if not log.exists():
        return 0
    return sum(json.loads(line)["tokens"] for line in log.read_text().splitlines())


def _one_kill(url: str, tmp: Path, tag: str, interval_ms: float, args: argparse.Namespace
              ) -> dict[str, Any]:
    """Both workers are up before the job: kill -> result is the reclaim plus the remainder."""
    tokens, queue = args.tokens, f"kill{tag}"
    client = Client(redis.Redis.from_url(url), ClientSettings(queue=queue))
    cfg: dict[str, str | int | float] = dict(
        SIM, queue=queue, checkpoint_interval_ms=interval_ms, stream_interval_ms=50)
    if args.engine == "sim":
        cfg["sim_step_ms"] = args.step_ms
    else:
        cfg.update(engine="vllm", max_num_seqs=4, max_model_len=args.max_model_len,
                   max_num_batched_tokens=2048, engine_hang_seconds=300)
        if args.model:  # a GPU run: e.g. bench/gpu/llama-2-7b-text with dummy weights
            cfg.update(model=str(Path(args.model).resolve()), load_format=args.load_format,
                       gpu_memory_utilization=args.gpu_memory_utilization)
    logs = {n: tmp / f"{tag}-{n}.steps" for n in "ab"}
    ws: dict[str, WorkerProcess] = {}
    try:
        for n in "ab":
            ws[n] = WorkerProcess(url, n, tmp / f"{tag}-{n}.log", step_log=str(logs[n]),
                                  **cfg).start()
            if args.model:  # two engines profiling one GPU's memory at once confuse vLLM
                ws[n].wait_ready(600)
        for w in ws.values():
            w.wait_ready(600)
        job = client.submit("Once upon a time", max_tokens=tokens, ignore_eos=True,
                            temperature=0.0, stream=args.stream)
        holder = wait_until(lambda: _s(client.redis.hget(QueueKeys.for_queue(queue).job(job.id),
                                                         "worker")), timeout=60, interval=0.005)
        other = "b" if holder == "a" else "a"
        wait_until(lambda: _engine_tokens(logs[holder]) >= args.share * tokens, timeout=600,
                   interval=0.002)
        ws[holder].kill()
        killed = time.monotonic()
        at_kill = _engine_tokens(logs[holder])
        res = client.wait(job.id, timeout=600)
        finish_s = time.monotonic() - killed
    finally:
        for w in ws.values():
            w.stop(60)
        client.close()
    assert res.usage.completion_tokens == tokens, res
    survivor = _engine_tokens(logs[other])
    return {"engine": args.engine, "mode": "resume" if interval_ms else "restart",
            "interval_ms": interval_ms, "tokens": tokens, "killed_at_token": at_kill,
            "resumed_at": res.resumed_at_token, "survivor_tokens": survivor,
            "wasted_tokens": at_kill + survivor - tokens,
            "kill_to_result_s": round(finish_s, 2)}


def kill(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(workdir=tmp)
        server.start()
        try:
            for i in range(args.repeat):
                for interval in (args.interval, 0):
                    print(json.dumps(_one_kill(server.url, Path(tmp), f"{i}{int(interval)}",
                                               interval, args)), flush=True)
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.resume")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--jobs", type=int, default=16)
    c.add_argument("--tokens", type=int, default=1000)
    c.add_argument("--step-ms", type=float, default=10)
    c.add_argument("--intervals", type=float, nargs="+", default=[0, 250, 1000, 5000])
    k = sub.add_parser("kill")
    k.add_argument("--tokens", type=int, default=3000)
    k.add_argument("--share", type=float, default=0.75)
    k.add_argument("--step-ms", type=float, default=5)
    k.add_argument("--interval", type=float, default=1000)
    k.add_argument("--repeat", type=int, default=2)
    k.add_argument("--engine", choices=["sim", "vllm"], default="sim")
    k.add_argument("--stream", action="store_true")
    k.add_argument("--model", default="", help="vllm: model directory (default: the tiny model)")
    k.add_argument("--load-format", default="dummy", help="vllm with --model: weights")
    k.add_argument("--max-model-len", type=int, default=2048)
    k.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                   help="vllm with --model: each of the two workers' share of the GPU")
    args = p.parse_args()
    {"cost": cost, "kill": kill}[args.what](args)


if __name__ == "__main__":
    main()
