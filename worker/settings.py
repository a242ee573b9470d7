"""Worker settings (environment prefix ``SLOTFILL_``, also read from ``.env``)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from producer.settings import ClientSettings


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(ClientSettings):
    """Everything ``slotfill worker`` reads. Also the engine's settings, passed to vLLM."""

    model_config = SettingsConfigDict(env_prefix="SLOTFILL_", env_file=".env", extra="ignore",
                                      use_attribute_docstrings=True)

    model: str = ""
    """Hugging Face model name or local directory. Empty: generate the tiny test model."""
    consumer: str = Field(default_factory=default_consumer_name)
    """This worker's name in the consumer group (unique per live worker)."""
    max_num_seqs: int = Field(0, ge=0)
    """Engine batch slots (vLLM ``max_num_seqs``); 0: vLLM's choice for the card and model
    (the generated tiny model: 32). The worker's start-up line and ``slotfill status`` show
    the value chosen."""
    headroom: int = Field(8, ge=0)
    """Jobs held ready beyond the engine's slots, so a freed slot is refilled in the next
    engine step instead of after a Redis round trip. ``adaptive`` admission holds at least
    this many (more when the measured finish rate needs more), ``fixed`` exactly this many,
    ``engine`` at most this many; 0: none beyond the slots, whatever the rule."""
    admission: Literal["adaptive", "engine", "fixed"] = "adaptive"
    """How many jobs each read takes (``worker/admission.py``). ``adaptive``: hold
    ``max_num_seqs`` plus a ready queue covering the jobs that finish during a refill (from
    the measured finish rate and step time; at least ``headroom``, at most ``max_num_seqs``),
    so 1,024 slots stay as full as 32. ``fixed``: always hold ``max_num_seqs + headroom``
    jobs, whatever the engine reports. ``engine``: fill the slots
    the engine reports free, plus a ready queue sized to what finishes during a refill (at
    most ``headroom`` jobs and ``ready_token_budget`` prompt tokens); past ``kv_high_water``
    only replace what starts. Jobs then wait in Redis, where any worker can take them, not
    in one worker's pending list (``python -m bench --modes fleet,fleet_fixed``: bench/README)."""
    ready_token_budget: int = Field(0, ge=0)
    """Prompt tokens (token ids counted, text estimated at 4 bytes a token) the ready queue
    may hold beyond the running batch; 0: ``max_num_batched_tokens`` (what one engine step
    can prefill). Long prompts thus count by tokens, not as one job each."""
    kv_high_water: float = Field(0.9, gt=0, le=1)
    """KV-cache usage (vLLM's, 0..1) from which free slots are not refilled: the engine is
    short of memory, so new jobs would only wait or be preempted inside it."""
    max_num_batched_tokens: int = Field(0, ge=0)
    """Tokens the engine schedules per step (vLLM ``max_num_batched_tokens``); 0: vLLM's
    choice (the tiny model: 2048)."""
    max_model_len: int = Field(0, ge=0)
    """Longest prompt + output in tokens; longer jobs fail with ``prompt_too_long``. 0: the
    model's own context length, as vLLM fits it to the card (the tiny model: 512)."""
    dtype: str = "auto"
    """Weight dtype passed to vLLM (``auto``, ``bfloat16``, ``float16``, ...)."""
    load_format: str = "auto"
    """``dummy`` gives random weights (benchmarks, the tiny test model)."""
    skip_tokenizer_init: bool = False
    """No tokenizer: prompts must be token ids and results carry token ids, not text."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of GPU memory vLLM may take (weights + KV cache). The CPU build sizes its KV
    cache by ``VLLM_CPU_KVCACHE_SPACE`` (GiB) instead; unset, the worker sets it to a quarter
    of the memory available at start (1 to 32 GiB; the tiny model: 1)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (vLLM ``enforce_eager``): faster start, slower steps."""
    executor: str = ""
    """vLLM ``distributed_executor_backend`` (``uni``, ``mp``, ``ray``); empty: vLLM's choice
    (the CPU build always uses ``mp``)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine spans (vLLM tensor parallelism)."""
    priority_scheduling: bool = False
    """Pass job priority to vLLM's priority scheduler (``scheduling_policy="priority"``)."""
    max_logprobs: int = Field(20, ge=0)
    """Most ``top_logprobs`` a job may ask for (vLLM ``max_logprobs``); more fails the job
    with ``invalid_request``."""
    lora_dir: str = ""
    """Directory of LoRA adapters, one subdirectory per adapter (PEFT layout), named after
    it; jobs pick one with ``adapter``. Empty: LoRA off (jobs naming an adapter fail with
    ``unknown_adapter``). An adapter is read once per worker: to change one, use a new name."""
    max_loras: int = Field(1, ge=1)
    """Adapters one engine batch may mix (vLLM ``max_loras``); only with ``lora_dir``."""
    max_lora_rank: int = Field(16, ge=1)
    """Largest adapter rank the engine accepts (vLLM ``max_lora_rank``: 1, 8, 16, 32, 64,
    ...); adapters of a higher rank are refused (``unknown_adapter``). Only with
    ``lora_dir``."""
    stream_interval_ms: float = Field(50.0, ge=0)
    """Streaming jobs: how long new output is collected before it is written to the job's
    token stream (all jobs' output in one round trip). An attempt's first delta is written at
    once, so time to first token does not wait for it. 0 writes as fast as Redis answers."""
    checkpoint_interval_ms: float = Field(1000.0, ge=0)
    """How often a running job's new token ids are added to its checkpoint (a job whose
    worker dies continues on a peer from there instead of starting over). A streaming job's
    ride along with each token-stream write at no extra command; other jobs' go in the
    same round trip, at most once per this interval. 0 = no checkpoints (reclaimed jobs
    start over). Measured cost: bench/README.md, "Checkpoints"."""
    checkpoint_peek: bool = True
    """vLLM engine: a job that does not stream keeps one final engine output, and its
    checkpoint's ids are read from vLLM's output processor once per interval (internal state,
    checked at start-up). False: such jobs ask for intermediate outputs as streaming ones do,
    one per ``stream_output_tokens`` tokens on vLLM releases without a per-request stream
    interval: an output per job every few steps on the worker's event loop."""
    stream_output_tokens: int = Field(4, ge=1)
    """Streaming jobs: the engine hands their new output to the worker every this many
    tokens (vLLM ``stream_interval``; the first token and the end always at once). 1 = every
    step, which costs the worker's Python an output per streaming job per step."""
    stream_max_entries: int = Field(10_000, ge=16)
    """Streaming jobs: entries kept per token stream (approximate cap); a reader that falls
    further behind misses the oldest deltas (the result still has the whole text)."""
    lease_seconds: float = Field(30.0, gt=0)
    """A job's entry may be reclaimed by a peer after this long without a lease renewal."""
    max_deliveries: int = Field(3, ge=1)
    """From this delivery on a job runs alone in its engine (culprit isolation); past 3 x this
    many deliveries it is dead-lettered with error ``poisoned`` whatever happened (PROTOCOL.md,
    the poison rule)."""
    grace_seconds: float = Field(30.0, ge=0)
    """On SIGTERM, how long in-flight jobs may run before they are handed back."""
    engine_hang_seconds: float = Field(120.0, gt=0)
    """No engine step for this long while jobs are in flight = a hung engine: exit non-zero."""
    heartbeat_seconds: float = Field(2.0, gt=0)
    """How often the worker refreshes its heartbeat hash (it expires after 3 periods)."""
    step_log: str = ""
    """If set, a JSON-lines file of every engine step (time, running, waiting, kv use)."""
    engine: str = "vllm"
    """``vllm`` (the real engine) or ``sim`` (a step-simulating stand-in for fault tests)."""
    sim_step_ms: float = Field(5.0, gt=0)
    """Step time of the ``sim`` engine."""
    sim_output_us: float = Field(0.0, ge=0)
    """``sim`` engine: CPU time (microseconds) its step takes on the worker's event loop per
    running request, as vLLM's output processing does in the worker's process (the GPU's
    steps at 1,024 slots); 0: none."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Port of the Prometheus ``/metrics`` endpoint; 0 turns it off. A port already taken
    only logs a warning: metrics never stop a worker."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics endpoint listens on."""
    log_json: bool = False
    """Log one JSON object per line (for log shippers) instead of plain text."""
    log_job_events: bool = True
    """One log line per job transition (started, reclaimed, finished, failed, ...)."""
    sentry_dsn: str = ""
    """Sentry DSN; empty: Sentry off. Events carry job id / queue / worker tags."""
    sentry_environment: str = ""
    """Sentry ``environment`` tag (e.g. ``production``)."""
    sentry_include_prompts: bool = False
    """Send stack-frame variables (which may hold prompt text) to Sentry. Off: no prompt
    or completion text leaves the worker."""
    celery_broker_url: str = ""
    """Broker for completion callbacks (jobs whose request names ``callback``) that give no
    ``broker_url`` of their own. Empty: such callbacks are refused (logged, counted)."""
    celery_brokers: list[str] = Field(default_factory=list)
    """Other broker URLs a job's callback may name (JSON list). Any other URL is refused, so
    a submitter cannot make workers connect to arbitrary hosts."""
    celery_send_timeout: float = Field(10.0, gt=0)
    """Seconds one callback send may take (connection and publish retries included)."""
    celery_redeliver_seconds: float = Field(30.0, gt=0)
    """A completion callback whose sender has not confirmed it this long after its result
    (the worker died, or the broker was down) is sent again by any worker. Repeats carry the
    same task id (``slotfill-<job id>``)."""


TINY_ENGINE = {"max_num_seqs": 32, "max_model_len": 512, "max_num_batched_tokens": 2048}
"""Engine sizes for the generated tiny model and the ``sim`` engine, which have no card and
model for vLLM to size by; settings given explicitly win."""


def apply_engine_defaults(settings: WorkerSettings, defaults: dict[str, int]) -> None:
    """Fill the engine sizes left at 0 (= the engine's choice) from ``defaults``."""
    for name, value in defaults.items():
        if not getattr(settings, name):
            setattr(settings, name, value)
