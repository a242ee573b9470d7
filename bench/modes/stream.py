"""``stream@<ms>`` modes: the slotfill mode with every job streaming (``stream=True``, the
worker's ``stream_interval_ms`` = ms) and the client reading each job through
``Client.stream``, checking the streamed output against the result: what streaming costs
next to the plain ``slotfill`` mode (the report's "Token streaming" table)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.modes.slotfill import check_alive, run_slotfill
from bench.workload import Request
from producer import Client, JobResult, TokenDelta, WaitTimeout
from slotfill.testing.fleet import WorkerProcess


def run_stream(cfg: BenchConfig, reqs: list[Request], run_dir: Path, redis_url: str,
               progress: Callable[[str, int, int], None], redis_pid: int | None,
               interval_ms: float) -> dict[str, Any]:
    raw = run_slotfill(cfg, reqs, run_dir, redis_url, progress, redis_pid,
                       name=f"stream{interval_ms:g}ms",
                       extra={"stream_interval_ms": interval_ms}, reader=read_stream)
    extra = raw["extra"]
    deltas = extra.pop("stream_deltas")
    tokens = sum(r["output_tokens"] for r in raw["records"])
    extra["stream"] = {"deltas": deltas, "deltas_per_job": deltas / max(1, len(reqs)),
                       "tokens_per_delta": tokens / max(1, deltas)}
    return raw


def read_stream(client: Client, job_id: str, workers: list[WorkerProcess]
                ) -> tuple[JobResult, int]:
    """The job's result and how many deltas its stream carried; the text read from the
    stream must be the result's (else the bench reports a broken stream, not a speed)."""
    text: list[str] = []
    ids: list[int] = []
    after = "0-0"
    while True:
        try:
            for event in client.stream(job_id, after=after, timeout=5.0):
                if isinstance(event, TokenDelta):
                    text.append(event.text)
                    ids.extend(event.token_ids)
                    after = event.entry_id
                elif isinstance(event, JobResult):
                    # Without a tokenizer (the GPU bench) the output is token ids only.
                    if event.ok and ("".join(text), ids if not event.text else None) != (
                            event.text, event.token_ids):
                        raise RuntimeError(f"job {job_id}: streamed output differs from the "
                                           "result")
                    return event, len(text)
                else:  # restarted: the new attempt's output follows
                    text.clear()
                    ids.clear()
        except WaitTimeout:
            check_alive(workers)
