"""Checkpoints of jobs that do not stream, without an engine output per few tokens.

A checkpointed job needs its new token ids about once per ``checkpoint_interval_ms``. Asking
vLLM for intermediate outputs (``output_kind`` DELTA) costs the worker's event loop one
output per ``stream_interval`` tokens for every such job: built, queued and handed to the
job's task, e.g. 256 of them per engine step at 1,024 slots on vLLM 0.26 (whose
``SamplingParams`` has no per-request ``stream_interval``), on the loop that also reads the
next jobs. Instead, such jobs keep vLLM's one final output, and one poller task reads the
ids that vLLM's output processor already holds for each running request (its
``request_states``: the detokenizer's ``output_token_ids``) once per interval.

That is vLLM's internal state, not its API: :func:`peekable` checks it is there at start-up
(else the engine asks for intermediate outputs as before), and a poll that finds a state
without ids stops peeking for good (the engine falls back for the jobs that come after).
A resumed attempt is never peeked: its seam needs the new text (worker/resume.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from worker.engines.base import DeltaSink

log = logging.getLogger("slotfill.worker")

SLICES = 8
"""The registered requests are polled in this many slices, one slice every
``interval / SLICES``: each job still hands over its ids once per interval, but the loop (and
Redis, which takes the checkpoint writes) never gets all of them in one burst (on an H200 at
256 slots the worker's loop lag p99 was 12.7 ms with one pass per second over ~270 jobs, 6.2
ms with checkpoints off). With tensor parallelism the same checkpoints came with 0.84-0.92 x
offline against 0.98 off, but those runs' slow engine steps did not line up with the passes:
that cost has another cause, not found yet (bench/README, "Every GPU row side by side")."""


def peekable(llm: Any) -> bool:
    """vLLM's output processor keeps per-request states this module can read."""
    states = getattr(getattr(llm, "output_processor", None), "request_states", None)
    return isinstance(states, dict)


@dataclass
class _Peeked:
    sink: DeltaSink
    slice: int
    sent: int = 0


class CheckpointPeeker:
    """Hands the new token ids of registered requests to their sinks once per interval."""

    def __init__(self, llm: Any, interval_s: float) -> None:
        self.llm = llm
        self.interval_s = interval_s
        self.enabled = interval_s > 0 and peekable(llm)
        self._jobs: dict[str, _Peeked] = {}
        self._task: asyncio.Task[None] | None = None
        self._added = 0

    def add(self, request_id: str, sink: DeltaSink) -> None:
        self._jobs[request_id] = _Peeked(sink, self._added % SLICES)
        self._added += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="checkpoint-peek")

    def remove(self, request_id: str) -> None:
        self._jobs.pop(request_id, None)

    async def _run(self) -> None:
        part = 0
        while self._jobs and self.enabled:
            await asyncio.sleep(self.interval_s / SLICES)
            self.poll(part)
            part = (part + 1) % SLICES

    def poll(self, part: int | None = None) -> None:
        """One pass over the registered requests of slice ``part`` (None: all of them)."""
        states: dict[str, Any] = self.llm.output_processor.request_states
        # Keyed by vLLM's internal id, which newer releases derive from ours.
        by_id = {getattr(s, "external_req_id", None) or rid: s for rid, s in states.items()}
        for rid, job in list(self._jobs.items()):
            if part is not None and job.slice != part:
                continue
            state = by_id.get(rid)
            if state is None:
                continue  # not in the engine yet, or just finished
            ids = getattr(getattr(state, "detokenizer", None), "output_token_ids", None)
            if not isinstance(ids, list):
                log.warning("vLLM's request state has no output_token_ids: checkpoints of "
                            "jobs that do not stream fall back to intermediate outputs")
                self.enabled = False
                return
            if len(ids) > job.sent:
                new = ids[job.sent:]
                job.sent = len(ids)
                job.sink("", new)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
