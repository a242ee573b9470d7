"""A step-simulating stand-in for the vLLM engine (``SLOTFILL_ENGINE=sim``).

It models what the feeder depends on: a fixed number of batch slots, a waiting queue inside
the engine, one token per running request per step, abort, and death; and, like vLLM's
chunked prefill, at most ``max_num_batched_tokens`` tokens per step (decodes first, then
prompt chunks in arrival order), so a long prompt holds its slot for several steps before
its first token. KV-cache usage is reported as the running requests' tokens over
``slots * max_model_len`` (it never limits admission here). Fault tests use it to
kill workers many times in little time; at least one fault test still uses the real engine.
A prompt containing ``__crash_engine__`` kills the engine once it runs (a poison request);
one containing ``__hang_engine__`` stops it stepping for good (a hung engine, for the
watchdog); one containing ``__engine_error__`` makes ``generate`` raise an unexpected error for
that request alone. Token-id prompts are checked against a vocabulary of ``VOCAB_SIZE`` ids.
The i-th generated token of every request is ``i % 997``; a request's ``stop_token_ids`` end
it (finish reason ``stop``, after ``min_tokens``) as in vLLM; the sim has no EOS token.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from producer.errors import EngineDead, ErrorCode, InvalidRequest
from producer.schema import JobRequest
from worker.engines.base import DeltaSink, Generation, StepStats

POISON = "__crash_engine__"
HANG = "__hang_engine__"
RAISE = "__engine_error__"
VOCAB_SIZE = 50_000


@dataclass
class _Seq:
    job_id: str
    prompt_tokens: int
    max_tokens: int
    done: asyncio.Future[None]
    generated: int = 0
    prefilled: int = 0
    first_token_at: float | None = None
    aborted: bool = False
    poison: bool = False
    hang: bool = False
    tokens: list[int] = field(default_factory=list)
    on_delta: DeltaSink | None = None
    stop_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    stopped: bool = False


class SimEngine:
    def __init__(self, slots: int, step_ms: float, max_model_len: int = 2048,
                 max_num_batched_tokens: int = 0, output_us: float = 0.0) -> None:
        self.slots = slots
        self.step_s = step_ms / 1000
        self.output_s = output_us / 1e6
        """Loop time per running request per step (vLLM's output processing, modelled)."""
        self.max_model_len = max_model_len
        self.token_budget = max_num_batched_tokens or 1 << 60
        self.stats = StepStats()
        self.eos_token_ids: frozenset[int] = frozenset()
        self._waiting: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}
        self._dead = False
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._step_loop())

    async def prompt_tokens(self, request: JobRequest) -> int:
        return (len(request.prompt) if isinstance(request.prompt, list)
                else len((request.prompt or "").split()) + sum(
                    len(m.content.split()) for m in request.messages or []))

    def detokenize(self, token_ids: list[int]) -> str:
        return " ".join(f"t{t}" for t in token_ids)

    async def generate(self, job_id: str, request: JobRequest,
                       on_delta: DeltaSink | None = None,
                       resume_ids: list[int] | None = None) -> Generation:
        if self._dead:
            raise EngineDead("sim engine is dead")
        if isinstance(request.prompt, list) and any(t >= VOCAB_SIZE for t in request.prompt):
            raise InvalidRequest(f"token id out of the vocabulary (size {VOCAB_SIZE})")
        n_prompt = await self.prompt_tokens(request)
        done = len(resume_ids or ())
        if n_prompt + done + request.max_tokens > self.max_model_len:
            raise InvalidRequest("prompt + max_tokens exceeds max_model_len",
                                 ErrorCode.prompt_too_long)
        self._ensure_loop()
        text = str(request.prompt) + " ".join(m.content for m in request.messages or [])
        if RAISE in text:
            raise RuntimeError("simulated engine error for one request")
        # A resumed request prefills its earlier output too, and its tokens go on where the
        # earlier attempt's stopped (token i is a function of i alone, so a resumed job's
        # text equals an uninterrupted one's).
        seq = _Seq(job_id, n_prompt + done, done + request.max_tokens,
                   asyncio.get_running_loop().create_future(), generated=done,
                   poison=POISON in text, hang=HANG in text, on_delta=on_delta,
                   stop_ids=frozenset(request.stop_token_ids or ()),
                   min_tokens=done + request.min_tokens)
        self._waiting.append(seq)
        self._wake.set()
        try:
            await seq.done
        except asyncio.CancelledError:
            await self.abort(job_id)
            raise
        if self._dead:
            raise EngineDead("sim engine died")
        # As vLLM, the text leaves out the stop token that ended the request.
        shown = seq.tokens[:-1] if seq.stopped else seq.tokens
        text = ("" if not shown else " " if done else "") + self.detokenize(shown)
        reason = "abort" if seq.aborted else "stop" if seq.stopped else "length"
        return Generation(text, seq.tokens, reason, n_prompt, seq.generated - done,
                          seq.first_token_at, aborted=seq.aborted)

    async def _step_loop(self) -> None:
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
            advanced = self._schedule()
            # Reported as vLLM's scheduler reports them: the batch this step ran with and what
            # was left waiting (counted after the step's finishes, a free slot that the next
            # schedule cannot fill would hide behind the jobs still waiting).
            scheduled = len(self._running), len(self._waiting)
            # The modelled output processing is part of the step (vLLM overlaps it with the
            # next step's compute), on the loop, just before the step's outputs are seen.
            busy = self.output_s * len(advanced)
            await asyncio.sleep(max(0.0, self.step_s - busy))
            if any(s.poison for s in self._running.values()):
                self._die()
                return
            if any(s.hang for s in self._running.values()):
                await asyncio.Event().wait()  # never set: no step ever again
            produced = [s for s in advanced if s.job_id in self._running]  # not aborted
            if busy:
                _busy(busy)
            now = time.time()
            for s in produced:
                s.generated += 1
                s.tokens.append(s.generated % 997)
                if s.on_delta is not None:
                    s.on_delta(f"{' ' if s.generated > 1 else ''}t{s.tokens[-1]}", s.tokens[-1:])
                s.first_token_at = s.first_token_at or now
                s.stopped = s.tokens[-1] in s.stop_ids and s.generated >= s.min_tokens
                if s.generated >= s.max_tokens or s.stopped:
                    self._finish(s)
            kv = sum(s.prefilled + s.generated for s in self._running.values())
            self.stats.record(*scheduled, kv / (self.slots * self.max_model_len), self.slots,
                              len(produced))

    def _schedule(self) -> list[_Seq]:
        """One step's token budget: decodes, then prompt chunks (running requests first, then
        newly admitted ones). Returns the requests that produce a token this step."""
        budget = self.token_budget
        advanced = [s for s in self._running.values() if s.prefilled >= s.prompt_tokens]
        budget -= len(advanced)
        for s in [s for s in self._running.values() if s.prefilled < s.prompt_tokens]:
            if budget <= 0:
                break
            budget = self._prefill(s, budget, advanced)
        while self._waiting and len(self._running) < self.slots and budget > 0:
            s = self._waiting.popleft()
            self._running[s.job_id] = s
            budget = self._prefill(s, budget, advanced)
        return advanced

    @staticmethod
    def _prefill(s: _Seq, budget: int, advanced: list[_Seq]) -> int:
        chunk = min(s.prompt_tokens - s.prefilled, budget)
        s.prefilled += chunk
        if s.prefilled >= s.prompt_tokens:
            advanced.append(s)  # the step that completes a prompt also samples its first token
        return budget - chunk

    def _finish(self, s: _Seq) -> None:
        self._running.pop(s.job_id, None)
        if not s.done.done():
            s.done.set_result(None)

    def _die(self) -> None:
        self._dead = True
        for s in [*self._running.values(), *self._waiting]:
            if not s.done.done():
                s.done.set_result(None)

    async def abort(self, job_id: str) -> None:
        for s in [*self._running.values(), *self._waiting]:
            if s.job_id == job_id:
                s.aborted = True
                if s in self._waiting:
                    self._waiting.remove(s)
                self._finish(s)

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()


def _busy(seconds: float) -> None:
    """Hold the event loop (and a CPU) for ``seconds``, as Python work in the loop does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
