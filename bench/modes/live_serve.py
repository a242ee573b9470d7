"""Live-load mode ``serve``: vLLM's own OpenAI server (what ``vllm serve`` runs) with the
bench's engine settings, driven over HTTP by the same open-loop arrivals, streaming.

Started as ``python -m vllm.entrypoints.openai.api_server`` rather than the ``vllm`` script:
the same server and arguments, and it also runs where vLLM is installed without its package
metadata (the ``vllm`` script reads its own version first and fails there, as in this
project's CPU venv). Requests go to ``/v1/completions`` with the prompt as token ids (the
server accepts a list of ints, also with ``--skip-tokenizer-init``), ``ignore_eos`` and
``max_tokens`` (exact lengths), ``return_token_ids`` (each chunk carries its token ids, so
tokens are counted without a tokenizer) and ``stream_options.include_usage``.

Queue wait is not in the server's answers; the mode reads the mean from the server's
``vllm:request_queue_time_seconds`` histogram (its ``_sum`` and ``_count`` before and after a
level): the time requests waited inside the engine before their first schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.config import BenchConfig
from bench.modes.openloop import Sample, Send
from bench.workload import Request
from slotfill.testing.redis_server import free_port

MODEL_NAME = "bench"


def serve_args(cfg: BenchConfig, port: int) -> list[str]:
    """The server's command line: the same engine settings the worker and ``LLM`` get."""
    e = cfg.engine
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", cfg.model_path, "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port),
            "--max-num-seqs", str(e.max_num_seqs),
            "--max-num-batched-tokens", str(e.max_num_batched_tokens),
            "--max-model-len", str(e.max_model_len), "--dtype", e.dtype,
            "--load-format", e.load_format,
            "--gpu-memory-utilization", str(e.gpu_memory_utilization),
            "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    if e.skip_tokenizer_init:
        args.append("--skip-tokenizer-init")
    if e.enforce_eager:
        args.append("--enforce-eager")
    return args


@contextmanager
def server(cfg: BenchConfig, run_dir: Path, ready_timeout: float = 1800
           ) -> Iterator[str]:
    """The server, started and answering ``/health``; yields its base URL."""
    port = free_port()
    log = run_dir / "live-serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = serve_args(cfg, port)
    (run_dir / "live-serve.cmd").write_text(" ".join(args) + "\n")
    with http_child(args, env, port, log, "vLLM server", ready_timeout) as base:
        yield base


@contextmanager
def http_child(args: list[str], env: dict[str, str], port: int, log: Path, what: str,
               ready_timeout: float, poll_s: float = 0.5) -> Iterator[str]:
    """``args`` as a child in a process group of its own, its output in ``log``; yields its
    base URL once its ``/health`` answers 200, and stops the group on the way out (the
    ``serve`` and ``gateway`` live-load modes)."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base, log, ready_timeout, what, poll_s)
        yield base
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float,
                what: str, poll_s: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{what} did not start (exit {proc.poll()}); {log}:\n{tail}")
        time.sleep(poll_s)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (API server + engine core), then SIGKILL; return
    once no process of the group is left (the next engine needs the accelerator's memory)."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def body(req: Request) -> dict[str, Any]:
    """The request as an OpenAI completions body (temperature 1.0: the jobs' default)."""
    return {"model": MODEL_NAME, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "ignore_eos": True, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}


def sender(http: aiohttp.ClientSession, base: str, timeout: float) -> Send:
    async def send(req: Request, s: Sample) -> None:
        await read_sse(http, base + "/v1/completions", body(req), s, timeout)

    return send


async def read_sse(http: aiohttp.ClientSession, url: str, payload: dict[str, Any], s: Sample,
                   timeout: float) -> None:
    """POST a streaming completions request and read its server-sent events to the end.
    Tokens per chunk: its ``token_ids`` where the server sends them, else one per chunk;
    the final usage (if sent) corrects the total."""
    async with http.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if r.status != 200:
            text = (await r.text())[:300]
            s.finish("refused" if r.status in (429, 503) else "error", f"HTTP {r.status}: {text}")
            return
        usage: int | None = None
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                s.finish("error", str(chunk["error"])[:300])
                return
            if chunk.get("usage"):
                usage = int(chunk["usage"].get("completion_tokens", 0))
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids")
                # Without token ids (a server that ignores return_token_ids) one chunk is one
                # engine output: one token at the default --stream-interval 1.
                s.tokens(len(ids) if ids is not None else 1)
        if usage is not None:
            s.n_tokens = usage
        s.finish("ok")


QUEUE_TIME = re.compile(r"^vllm:request_queue_time_seconds_(sum|count)(?:\{[^}]*\})? (\S+)$",
                        re.M)


def queue_time(base: str) -> tuple[float, float]:
    """(sum of seconds, requests) of the server's queue-time histogram so far."""
    try:
        text = httpx.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0, 0.0
    got = {"sum": 0.0, "count": 0.0}
    for kind, value in QUEUE_TIME.findall(text):
        got[kind] += float(value)
    return got["sum"], got["count"]
