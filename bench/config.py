"""What one bench run measures: the engine settings and the workload, the same for every mode.

A ``BenchConfig`` is written to the run directory as JSON; each mode's engine process reads it
back, so every mode sees byte-for-byte the same settings and requests.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

ALL_MODES = ("offline", "offline_split", "slotfill", "asyncio", "celery_batch",
             "celery_per_request", "fleet", "fleet_fixed", "fleet_adaptive")
"""Run order. Offline first: every ratio is relative to it."""
DEFAULT_MODES = ("offline", "slotfill", "asyncio", "celery_batch", "celery_per_request")
FLEET_MODES = {"fleet": "engine", "fleet_fixed": "fixed", "fleet_adaptive": "adaptive"}
"""Several worker processes on one queue (``--workers``), and the admission policy each runs."""
WORKER_MODES = ("slotfill", *FLEET_MODES)
"""Modes whose engines are slotfill workers: the only ones ``--engine sim`` can run."""
STREAM_PREFIX = "stream@"
"""``stream@<ms>``: the slotfill mode with every job streaming, the worker coalescing each
job's output for <ms> milliseconds per write (``--modes slotfill,stream@50``)."""


def stream_interval(mode: str) -> float | None:
    """The coalescing interval of a ``stream@<ms>`` mode; None for any other mode."""
    if not mode.startswith(STREAM_PREFIX):
        return None
    try:
        ms = float(mode[len(STREAM_PREFIX):])
    except ValueError:
        return None
    return ms if ms >= 0 else None


def is_worker_mode(mode: str) -> bool:
    return mode in WORKER_MODES or stream_interval(mode) is not None


@dataclass
class EngineConfig:
    """Engine settings shared by every mode (vLLM ``EngineArgs`` names)."""

    model: str = ""
    """Model name or directory; empty = the generated tiny model (worker/engines/tiny_model.py)."""
    load_format: str = "dummy"
    skip_tokenizer_init: bool = False
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 512
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    enforce_eager: bool = False
    headroom: int = 8
    """slotfill worker and asyncio feeder: requests held waiting inside the engine beyond its
    slots (capacity = max_num_seqs + headroom)."""
    engine: str = "vllm"
    """Workers' engine: ``vllm``, or ``sim`` (the step-simulating stand-in; worker modes only)."""
    sim_step_ms: float = 5.0
    sim_output_us: float = 0.0
    """``--engine sim``: loop time per running request per step (worker setting)."""
    admission: str = ""
    """slotfill and stream workers' admission rule (``adaptive``/``fixed``/``engine``); empty =
    the worker's default. The fleet modes set their own."""
    tensor_parallel_size: int = 1
    """GPUs each engine spans (every mode's engine, offline's too)."""
    executor: str = ""
    """vLLM ``distributed_executor_backend``; empty = vLLM's choice, except ``mp`` when
    ``tensor_parallel_size`` > 1 (one process per GPU, as the worker needs it)."""
    checkpoint_interval_ms: float = -1.0
    """Workers' ``checkpoint_interval_ms`` (0 = no checkpoints: jobs that do not stream get
    one final output from the engine); negative = the worker's default."""
    checkpoint_outputs: bool = False
    """Workers take checkpoints from intermediate engine outputs (``checkpoint_peek`` off),
    as before the output processor was read: what those outputs cost."""

    @property
    def executor_backend(self) -> str:
        return self.executor or ("mp" if self.tensor_parallel_size > 1 else "")

    def engine_kwargs(self, model_path: str) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` and ``AsyncEngineArgs``: the same set the
        slotfill worker passes (worker/engines/vllm.py), so every mode runs one engine."""
        return {
            "model": model_path,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "load_format": self.load_format,
            "skip_tokenizer_init": self.skip_tokenizer_init,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "disable_log_stats": False,
            "tensor_parallel_size": self.tensor_parallel_size,
            **({"distributed_executor_backend": self.executor_backend}
               if self.executor_backend else {}),
        }

    def worker_settings(self, model_path: str) -> dict[str, str | int | float]:
        """The same settings as ``SLOTFILL_*`` variables for a worker subprocess."""
        return {
            "model": model_path,
            "max_num_seqs": self.max_num_seqs,
            "headroom": self.headroom,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "dtype": self.dtype,
            "load_format": self.load_format,
            "skip_tokenizer_init": int(self.skip_tokenizer_init),
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": int(self.enforce_eager),
            "engine": self.engine,
            "sim_step_ms": self.sim_step_ms,
            **({"sim_output_us": self.sim_output_us} if self.sim_output_us else {}),
            **({"admission": self.admission} if self.admission else {}),
            "tensor_parallel_size": self.tensor_parallel_size,
            **({"executor": self.executor_backend} if self.executor_backend else {}),
            **({"checkpoint_interval_ms": self.checkpoint_interval_ms}
               if self.checkpoint_interval_ms >= 0 else {}),
            **({"checkpoint_peek": 0} if self.checkpoint_outputs else {}),
        }


@dataclass
class WorkloadConfig:
    """N requests; prompt length uniform in [min_prompt_tokens, prompt_tokens]; output length
    uniform in [min_output, max_output], exact (``ignore_eos`` + ``max_tokens``)."""

    requests: int = 1000
    prompt_tokens: int = 64
    min_prompt_tokens: int = 0
    """0 = every prompt has exactly ``prompt_tokens`` tokens."""
    min_output: int = 16
    max_output: int = 256
    seed: int = 0
    vocab_size: int = 0
    """Token ids are drawn from [first_token_id, vocab_size); 0 = read from the model."""
    first_token_id: int = 3
    """Skips the tiny model's special tokens (<s>, </s>, <unk>)."""
    long_share: float = 0.0
    """Share of requests whose prompt has ``long_prompt_tokens`` tokens instead (mixed
    lengths: admission must count them by tokens)."""
    long_prompt_tokens: int = 0
    text: bool = False
    """Text prompts cut from the model directory's ``corpus.txt.gz`` (bench/workload.py),
    tokenized and detokenized by the engine, instead of token ids."""


@dataclass
class BenchConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    celery_requests: int = 64
    """Cap for the celery per-request mode (one request per task is slow by design)."""
    celery_batch: int = 0
    """Requests per task in the celery static-batch mode; 0 = max_num_seqs."""
    workers: int = 2
    """Worker processes of the fleet modes, all on one queue (and one GPU, if there is one)."""
    gpus: list[str] = field(default_factory=list)
    """Fleet modes: one worker per entry, each seeing only that GPU (``CUDA_VISIBLE_DEVICES``
    = the entry; ``0+1`` = GPUs 0 and 1, for a tensor-parallel worker); overrides
    ``workers``. Empty: every worker sees what the bench sees."""
    model_path: str = ""
    """Resolved model directory (filled in by the runner)."""
    run_dir: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        return cls(engine=EngineConfig(**d["engine"]), workload=WorkloadConfig(**d["workload"]),
                   **{k: v for k, v in d.items() if k not in ("engine", "workload")})

    @classmethod
    def load(cls, path: str | Path) -> BenchConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @property
    def batch_size(self) -> int:
        return self.celery_batch or self.engine.max_num_seqs


def engine_env() -> None:
    """What an engine process on this box needs (WorkerProcess sets the same for workers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model(engine: EngineConfig) -> str:
    """The model directory to load: the given one, or the generated tiny model."""
    if engine.model:
        return engine.model
    from worker.engines.tiny_model import make_tiny_model
    from worker.runner import default_model_dir

    return str(make_tiny_model(default_model_dir()))


def model_vocab_size(model_path: str) -> int:
    """``vocab_size`` from the model's config.json (a directory, or a Hugging Face name)."""
    cfg = Path(model_path) / "config.json"
    if cfg.exists():
        data = json.loads(cfg.read_text())
        vocab = data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")
        if vocab:
            return int(vocab)
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_path).get_text_config().vocab_size)
