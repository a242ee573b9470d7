"""``Engine`` on vLLM's ``AsyncLLM`` (CPU or CUDA build: the same code path)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from producer.errors import EngineDead, ErrorCode, InvalidRequest
from producer.keys import Priority
from producer.schema import JobRequest
from worker.engines.base import DeltaSink, Generation, StepStats
from worker.engines.logprobs import convert_logprobs
from worker.engines.vllm_features import Adapters, lora_request, structured_outputs_kwargs
from worker.engines.vllm_peek import CheckpointPeeker
from worker.settings import WorkerSettings

MAX_STREAM_WINDOW_TOKENS = 256
"""Cap on tokens per intermediate output of a streaming job (a stalled step estimate must
not turn streaming into one output at the end)."""
_PRIORITY = {Priority.high: -1, Priority.normal: 0, Priority.low: 1}
CPU_KV_SHARE, CPU_KV_MIN_GIB, CPU_KV_MAX_GIB = 0.25, 1, 32
"""Unset ``VLLM_CPU_KVCACHE_SPACE``: a quarter of the memory available at start, 1-32 GiB
(vLLM would otherwise read ``gpu_memory_utilization`` as a share of all RAM and fail)."""
log = logging.getLogger("slotfill.worker")


def _cpu_build_defaults() -> None:
    """On vLLM's CPU build, set what its defaults get wrong unless the user set it:
    ``VLLM_CPU_KVCACHE_SPACE`` (see ``CPU_KV_SHARE``) and ``VLLM_USE_AOT_COMPILE=0``.

    vLLM 0.32's CPU build saves an AOT-compiled model it cannot load again ("'function'
    object has no attribute 'finalize_loading'"), so every start compiled the model anew;
    without AOT it loads torch.compile's own cache: "init engine" took 5.6 s instead of
    13.9 s on the second start of the tiny model here (2-core box, load 2-3)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
    except ImportError:
        return
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    gib = int(min(max(available * CPU_KV_SHARE, CPU_KV_MIN_GIB), CPU_KV_MAX_GIB))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)


def stat_logger_class(on_step: Callable[[Any], None],
                      on_tokens: Callable[[int], None] | None = None) -> Any:
    """A vLLM stat-logger class (for ``stat_loggers=[...]``) that hands the scheduler's
    stats of every engine step to ``on_step``. Public: the bench logs its own engines' steps
    with the worker's logger."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SlotStatLogger(StatLoggerBase):  # type: ignore[misc]
        """Sees the scheduler's state every engine step."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                if on_tokens is not None and iteration_stats is not None:
                    on_tokens(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
                on_step(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SlotStatLogger


def _stat_logger_factory(stats: StepStats, slots: Callable[[], int]) -> Any:
    generated = [0]  # the step's generated tokens, handed over just before its scheduler stats

    def on_tokens(n: int) -> None:
        generated[0] += n

    def on_step(scheduler_stats: Any) -> None:
        stats.record(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                     scheduler_stats.kv_cache_usage, slots(), generated[0])
        generated[0] = 0

    return stat_logger_class(on_step, on_tokens)


def _client_errors() -> tuple[type[BaseException], ...]:
    """Exceptions vLLM raises for a bad request (not a broken engine). ``VLLMClientError``
    appeared after 0.26, whose validation error is a plain ValueError subclass."""
    errors: list[type[BaseException]] = [ValueError, TypeError]
    try:
        from vllm import exceptions
    except ImportError:
        return tuple(errors)
    client_error = getattr(exceptions, "VLLMClientError", None)
    if isinstance(client_error, type) and issubclass(client_error, BaseException):
        errors.append(client_error)
    return tuple(errors)


def engine_input_builder() -> Any:
    """Token ids in the engine's already-rendered input form where this vLLM has one (public:
    the bench feeds its own ``AsyncLLM`` the worker's way).

    A plain ``{"prompt_token_ids": ...}`` is treated as a raw prompt and preprocessed in a
    thread pool: measured here, that delayed refills enough to leave slots idle for several
    steps. Older vLLM releases (the GPU's 0.26) lack the rendered form and take the dict.
    """
    try:
        from vllm.inputs.engine import tokens_input
    except ImportError:
        return lambda ids: {"prompt_token_ids": ids}
    return tokens_input


INLINE_TOKENIZE_CHARS = 16_384
"""Prompts up to this many characters are tokenized on the event loop (well under a
millisecond); longer ones on a thread."""


def _prompt_chars(req: JobRequest) -> int:
    if isinstance(req.prompt, str):
        return len(req.prompt)
    return sum(len(m.content) for m in req.messages or ())


class _Accumulator:
    """Builds a request's ``Generation`` from its outputs: one final output, or (streaming)
    one delta per step, each also handed to the job's delta sink."""

    def __init__(self, on_delta: DeltaSink | None) -> None:
        self.on_delta = on_delta
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.seen = False
        self.logprobs: list[Any] = []

    def add(self, out: Any) -> None:
        self.seen = True
        comp = out.outputs[0] if out.outputs else None
        m = getattr(out, "metrics", None)
        if (self.first_token_at is None and m is not None
                and getattr(m, "first_token_latency", None) and m.arrival_time):
            self.first_token_at = m.arrival_time + m.first_token_latency
        if comp is None:
            return
        ids = list(comp.token_ids)
        self.text.append(comp.text)
        self.token_ids.extend(ids)
        if comp.logprobs is not None:
            self.logprobs.extend(comp.logprobs)
        self.finish_reason = comp.finish_reason or self.finish_reason
        if self.on_delta is not None:
            self.on_delta(comp.text, ids)

    def generation(self, n_prompt: int) -> Generation:
        assert self.seen, "the engine returned no output"
        return Generation(
            text="".join(self.text), token_ids=self.token_ids,
            finish_reason=self.finish_reason, prompt_tokens=n_prompt,
            completion_tokens=len(self.token_ids), first_token_at=self.first_token_at,
            aborted=self.finish_reason == "abort",
        )


def _lora_args(settings: WorkerSettings) -> dict[str, Any]:
    """LoRA engine arguments: only with a ``lora_dir``, since LoRA layers cost every step
    (and on the CPU build turn off torch.compile) even for jobs without an adapter."""
    if not settings.lora_dir:
        return {}
    return {"enable_lora": True, "max_loras": settings.max_loras,
            "max_lora_rank": settings.max_lora_rank}


def _eos_ids(hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """The model's EOS ids: its config's (an int or a list) and its tokenizer's."""
    raw = getattr(hf_config, "eos_token_id", None)
    ids = set(raw if isinstance(raw, list) else [] if raw is None else [raw])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


class VllmEngine:
    def __init__(self, settings: WorkerSettings, model_path: str) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.settings = settings
        self.slots = settings.max_num_seqs
        self.stats = StepStats()
        _cpu_build_defaults()
        # 0 = unset: vLLM picks for the card and the model; the values it chose are read back.
        args = AsyncEngineArgs(
            model=model_path,
            max_num_seqs=settings.max_num_seqs or None,
            max_num_batched_tokens=settings.max_num_batched_tokens or None,
            max_model_len=settings.max_model_len or None,
            dtype=settings.dtype,
            load_format=settings.load_format,
            skip_tokenizer_init=settings.skip_tokenizer_init,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            distributed_executor_backend=settings.executor or None,
            tensor_parallel_size=settings.tensor_parallel_size,
            scheduling_policy="priority" if settings.priority_scheduling else "fcfs",
            stream_interval=settings.stream_output_tokens,
            disable_log_stats=False,
            enable_log_requests=False,
            max_logprobs=settings.max_logprobs,
            **_lora_args(settings),
        )
        self.adapters = Adapters(settings.lora_dir, settings.max_lora_rank)
        self._client_errors = _client_errors()
        self.llm = AsyncLLM.from_engine_args(
            args, stat_loggers=[_stat_logger_factory(self.stats, lambda: self.slots)]
        )
        self.max_model_len: int = self.llm.model_config.max_model_len
        self._adopt_engine_choice()
        self.tokenizer = None if settings.skip_tokenizer_init else self.llm.get_tokenizer()
        self.eos_token_ids = _eos_ids(self.llm.model_config.hf_config, self.tokenizer)
        self._engine_input = engine_input_builder()
        self._peeker = CheckpointPeeker(
            self.llm, settings.checkpoint_interval_ms / 1000 if settings.checkpoint_peek else 0)
        if settings.checkpoint_interval_ms > 0:
            log.info("checkpoints of jobs that do not stream: %s", "read from vLLM's output "
                     "processor" if self._peeker.enabled else "intermediate outputs")

    def _adopt_engine_choice(self) -> None:
        """The sizes vLLM settled on become the worker's (capacity, admission, heartbeat)."""
        sched = self.llm.vllm_config.scheduler_config
        s = self.settings
        s.max_num_seqs, s.max_num_batched_tokens = sched.max_num_seqs, sched.max_num_batched_tokens
        s.max_model_len = self.max_model_len
        self.slots = s.max_num_seqs
        kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        log.info("engine ready: %s, max_num_seqs=%d, max_model_len=%d, "
                 "max_num_batched_tokens=%d%s", s.model or "generated tiny model", s.max_num_seqs,
                 s.max_model_len, s.max_num_batched_tokens,
                 f", VLLM_CPU_KVCACHE_SPACE={kv} GiB" if kv else "")

    async def _tokenize(self, req: JobRequest) -> list[int]:
        """The prompt's token ids. A long prompt is tokenized on a thread: a 1 MB prompt took
        ~1.8 s here, and on the event loop that starved lease renewal and heartbeats (live
        jobs were reclaimed from their own worker)."""
        if _prompt_chars(req) <= INLINE_TOKENIZE_CHARS:
            return self._prompt_ids(req)
        return await asyncio.to_thread(self._prompt_ids, req)

    def _prompt_ids(self, req: JobRequest) -> list[int]:
        if isinstance(req.prompt, list):
            return req.prompt
        if self.tokenizer is None:
            raise InvalidRequest("this worker has no tokenizer: send the prompt as token ids")
        if req.messages is not None:
            msgs = [m.model_dump() for m in req.messages]
            try:
                text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                          tokenize=False)
            except Exception as e:  # a template error is about this request's messages
                raise InvalidRequest(f"chat template failed: {e}") from None
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(req.prompt or ""))

    def _sampling_params(self, req: JobRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {}
        if req.top_k is not None:
            extra["top_k"] = req.top_k
        if req.logprobs:
            top = req.top_logprobs or 0
            if top > self.settings.max_logprobs:
                raise InvalidRequest(f"top_logprobs {top} is over this worker's max_logprobs "
                                     f"{self.settings.max_logprobs}")
            extra["logprobs"] = top
        try:
            extra.update(structured_outputs_kwargs(req))
            return SamplingParams(
                max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                stop=req.stop, stop_token_ids=req.stop_token_ids, seed=req.seed,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                detokenize=self.tokenizer is not None,
                output_kind=RequestOutputKind.FINAL_ONLY, **extra,
            )
        except self._client_errors as e:  # 0.32's VLLMValidationError is no ValueError
            raise InvalidRequest(f"invalid sampling parameters: {e}") from None

    def _stream_window(self, params: Any, stream: bool) -> None:
        """Where vLLM takes a per-request ``stream_interval`` (0.32; not 0.26), ask for one
        output per coalescing window (``stream_interval_ms`` worth of measured steps, or
        ``checkpoint_interval_ms`` for a job that is only checkpointed): the worker writes no
        more often than that anyway."""
        step_s = self.stats.step_s
        if step_s <= 0 or not hasattr(params, "stream_interval"):
            return
        s = self.settings
        window_ms = s.stream_interval_ms if stream else s.checkpoint_interval_ms
        tokens = int(window_ms / 1000 / step_s)
        if tokens > self.settings.stream_output_tokens:
            params.stream_interval = min(tokens, MAX_STREAM_WINDOW_TOKENS)

    def _lora_request(self, req: JobRequest) -> Any:
        """vLLM's ``LoRARequest`` for the job's ``adapter`` (None: the base model); raises
        InvalidRequest ``unknown_adapter`` when this worker has no such adapter."""
        return lora_request(self.adapters, req.adapter)

    def _check_length(self, n_prompt: int, req: JobRequest) -> None:
        if n_prompt + req.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens", ErrorCode.prompt_too_long)

    async def prompt_tokens(self, request: JobRequest) -> int:
        return len(await self._tokenize(request))

    def detokenize(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(token_ids))

    async def generate(self, job_id: str, request: JobRequest,
                       on_delta: DeltaSink | None = None,
                       resume_ids: list[int] | None = None) -> Generation:
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt = await self._tokenize(request)
        # A resumed job's earlier output joins its prompt as ids: nothing is re-tokenized,
        # and the prompt's cached prefix blocks are reused.
        ids = prompt + list(resume_ids or ())
        self._check_length(len(ids), request)
        params = self._sampling_params(request)
        # A job that is only checkpointed keeps one final output; its ids are peeked.
        peek = (on_delta is not None and not request.stream and resume_ids is None
                and self._peeker.enabled)
        if on_delta is not None and not peek:
            # Only jobs with a sink (streaming; checkpointed where peeking is out) pay for
            # intermediate outputs (one per ``stream_output_tokens`` tokens, the engine's
            # stream_interval, or per window); the rest get one.
            from vllm.sampling_params import RequestOutputKind
            params.output_kind = RequestOutputKind.DELTA
            self._stream_window(params, request.stream)
        priority = _PRIORITY[request.priority] if self.settings.priority_scheduling else 0
        # Outside the try: InvalidRequest is a ValueError, which would lose unknown_adapter.
        lora = self._lora_request(request)
        acc = _Accumulator(None if peek else on_delta)
        if peek and on_delta is not None:
            self._peeker.add(job_id, on_delta)
        try:
            async for out in self.llm.generate(self._engine_input(ids), params,
                                               request_id=job_id, priority=priority,
                                               lora_request=lora):
                acc.add(out)
        except EngineDeadError as e:
            raise EngineDead(str(e) or "engine died") from e
        except self._client_errors as e:
            raise InvalidRequest(f"rejected by the engine: {e}") from None
        finally:
            self._peeker.remove(job_id)
        if self.llm.errored:
            raise EngineDead("engine died")
        gen = acc.generation(len(prompt))
        if request.logprobs:
            gen.logprobs = convert_logprobs(acc.logprobs, gen.token_ids, self.tokenizer,
                                            request.top_logprobs or 0)
        return gen

    async def abort(self, job_id: str) -> None:
        await self.llm.abort(job_id)

    def close(self) -> None:
        self._peeker.close()
        self.llm.shutdown()
