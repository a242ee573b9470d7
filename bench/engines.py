"""Engines for the in-process modes (offline, asyncio, celery), built like the worker's.

Everything here imports vLLM lazily: only engine processes call it. Each engine gets a step
logger that appends one JSON line per engine step (``t``, ``running``, ``waiting``), the same
shape as the worker's ``SLOTFILL_STEP_LOG``, so every mode's occupancy is read one way.
``AsyncLLM`` gets it through the worker's own stat logger (``stat_logger_class``); ``LLM``
takes no stat loggers, so its logger manager's ``record`` is wrapped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from bench.config import BenchConfig, engine_env

_MONO_TO_WALL = time.time() - time.monotonic()


def wall(mono_ts: float | None) -> float | None:
    """An engine-core timestamp (``time.monotonic`` of any process here) as Unix time."""
    return None if not mono_ts else mono_ts + _MONO_TO_WALL


class StepWriter:
    """Appends ``{"t", "running", "waiting"}`` per engine step."""

    def __init__(self, path: str | Path) -> None:
        self.f: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 - lives with the engine

    def record(self, scheduler_stats: Any) -> None:
        if scheduler_stats is not None:
            self.f.write(json.dumps({"t": time.time(),
                                     "running": scheduler_stats.num_running_reqs,
                                     "waiting": scheduler_stats.num_waiting_reqs}) + "\n")

    def close(self) -> None:
        self.f.close()


def build_llm(cfg: BenchConfig, steps: StepWriter) -> Any:
    """``vllm.LLM`` with the shared settings, stats on (as the worker's engine has them), and
    the step writer hooked into its stat-logger manager (``LLM`` takes no ``stat_loggers``)."""
    engine_env()
    from vllm import LLM

    llm = LLM(**cfg.engine.engine_kwargs(cfg.model_path))
    manager = getattr(llm.llm_engine, "logger_manager", None)
    if manager is None:
        raise RuntimeError("this vLLM's LLMEngine has no logger_manager: no step log")
    inner = manager.record

    def record(*args: Any, **kwargs: Any) -> Any:
        writer_stats = kwargs.get("scheduler_stats", args[0] if args else None)
        steps.record(writer_stats)
        return inner(*args, **kwargs)

    manager.record = record
    return llm


def build_async_llm(cfg: BenchConfig, steps: StepWriter) -> Any:
    """``AsyncLLM`` exactly as worker/engines/vllm.py builds it."""
    engine_env()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = cfg.engine.engine_kwargs(cfg.model_path)
    args = AsyncEngineArgs(**kwargs, enable_log_requests=False)
    from worker.engines.vllm import stat_logger_class

    return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_class(steps.record)])


def sampling_params(cfg: BenchConfig, max_tokens: int, final_only: bool = False) -> Any:
    """The worker's sampling parameters for a job body ``{prompt, max_tokens, ignore_eos}``
    (temperature 1.0, top_p 1.0: the JobRequest defaults)."""
    from vllm import SamplingParams

    extra: dict[str, Any] = {}
    if final_only:
        from vllm.sampling_params import RequestOutputKind

        extra["output_kind"] = RequestOutputKind.FINAL_ONLY
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=1.0, ignore_eos=True,
                          detokenize=not cfg.engine.skip_tokenizer_init, **extra)


def token_prompt(prompt: list[int] | str) -> dict[str, Any]:
    """A token-id (or, ``--text``, a text) prompt for ``LLM.generate``."""
    return {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": prompt}


def async_input_builder() -> Any:
    """The worker's own token-id input form for ``AsyncLLM.generate``."""
    from worker.engines.vllm import engine_input_builder

    return engine_input_builder()


def output_record(out: Any, index: int, submitted: float, started: float,
                  finished: float | None = None) -> dict[str, Any]:
    """One request's timings from a vLLM ``RequestOutput`` (engine metrics where present)."""
    comp = out.outputs[0] if out.outputs else None
    m = getattr(out, "metrics", None)
    sched = wall(getattr(m, "scheduled_ts", 0.0)) if m is not None else None
    first = wall(getattr(m, "first_token_ts", 0.0)) if m is not None else None
    last = wall(getattr(m, "last_token_ts", 0.0)) if m is not None else None
    return {
        "index": index,
        "output_tokens": len(comp.token_ids) if comp else 0,
        "submitted": submitted,
        "started": started,
        "scheduled": sched,
        "first_token": first,
        "finished": finished if finished is not None else (last or time.time()),
    }
