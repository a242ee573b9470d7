"""Worker settings (environment prefix ``SLOTFILL_``, also read from ``.env``)."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from producer.settings import ClientSettings


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(ClientSettings):
    """Everything ``slotfill worker`` reads. Also the engine's settings, passed to vLLM."""

    model_config = SettingsConfigDict(env_prefix="SLOTFILL_", env_file=".env", extra="ignore")

    model: str = ""
    """Hugging Face model name or local directory. Empty: generate the tiny test model."""
    consumer: str = Field(default_factory=default_consumer_name)
    """This worker's name in the consumer group (unique per live worker)."""
    max_num_seqs: int = Field(32, ge=1)
    """Engine batch slots (vLLM ``max_num_seqs``)."""
    headroom: int = Field(8, ge=0)
    """Jobs held waiting inside the engine beyond its slots, so a freed slot is refilled in
    the same engine step instead of after a Redis round trip. Capacity = slots + headroom."""
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int = Field(512, ge=16)
    dtype: str = "auto"
    load_format: str = "auto"
    """``dummy`` gives random weights (benchmarks, the tiny test model)."""
    skip_tokenizer_init: bool = False
    """No tokenizer: prompts must be token ids and results carry token ids, not text."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = False
    executor: str = ""
    """vLLM ``distributed_executor_backend`` (``uni``, ``mp``, ``ray``); empty: vLLM's choice
    (the CPU build always uses ``mp``)."""
    tensor_parallel_size: int = Field(1, ge=1)
    priority_scheduling: bool = False
    """Pass job priority to vLLM's priority scheduler (``scheduling_policy="priority"``)."""
    lease_seconds: float = Field(30.0, gt=0)
    """A job's entry may be reclaimed by a peer after this long without a lease renewal."""
    max_deliveries: int = Field(3, ge=1)
    """A job delivered more often than this is dead-lettered with error ``poisoned``."""
    grace_seconds: float = Field(30.0, ge=0)
    """On SIGTERM, how long in-flight jobs may run before they are handed back."""
    engine_hang_seconds: float = Field(120.0, gt=0)
    """No engine step for this long while jobs are in flight = a hung engine: exit non-zero."""
    heartbeat_seconds: float = Field(2.0, gt=0)
    step_log: str = ""
    """If set, a JSON-lines file of every engine step (time, running, waiting, kv use)."""
    engine: str = "vllm"
    """``vllm`` (the real engine) or ``sim`` (a step-simulating stand-in for fault tests)."""
    sim_step_ms: float = Field(5.0, gt=0)
    """Step time of the ``sim`` engine."""
