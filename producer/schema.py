"""Wire schemas: the job request (OpenAI-shaped) and the job result. JSON only."""

from __future__ import annotations

import json
import math
import re
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from producer.features import (
    ADAPTER_NAME,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    ResponseFormat,
    StructuredOutputs,
    TokenLogprob,
)
from producer.keys import Priority

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOKENS_LIMIT = 1_000_000
"""Upper bound checked at submit; the worker checks the real bound (``max_model_len``)."""


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.queued, JobStatus.running)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


CELERY_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,199}$")
CALLBACK_BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqs")


class CeleryCallback(BaseModel):
    """Completion callback: when the job is terminal, the worker sends Celery task
    ``celery_task`` with the job's result (a dict, the JSON result below) as its one
    argument, to ``broker_url`` (or the worker's ``celery_broker_url``) and ``queue``."""

    model_config = ConfigDict(extra="forbid")

    celery_task: str = Field(min_length=1, max_length=200)
    """Registered task name, e.g. ``myapp.tasks.on_llm_result``."""
    broker_url: str | None = Field(None, max_length=1024)
    """Celery broker URL; workers only send to brokers their settings allow."""
    queue: str | None = Field(None, min_length=1, max_length=200)
    """Celery queue to route the task to (default: the task's own routing)."""

    @field_validator("celery_task")
    @classmethod
    def _task_name(cls, v: str) -> str:
        if not CELERY_TASK_NAME.match(v):
            raise ValueError("celery_task must be a dotted task name")
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        if v is not None and v.split("://", 1)[0] not in CALLBACK_BROKER_SCHEMES:
            raise ValueError(f"broker_url scheme must be one of {', '.join(CALLBACK_BROKER_SCHEMES)}")
        return v


class JobRequest(BaseModel):
    """One inference job, as OpenAI's completions / chat completions shape it.

    Exactly one of ``prompt`` (text or token ids) and ``messages`` (chat, rendered with the
    model's chat template) is given. Unknown fields are rejected.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    """Token ids that end the generation (finish reason ``stop``); each ≥ 0, at most 64."""
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: Literal[1] = 1
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    priority: Priority = Priority.normal
    stream: bool = False
    """Append the output, as it is generated, to the job's token stream
    (``Client.stream``); the result is written as usual when the job ends."""
    deadline: float | None = Field(None, gt=0)
    """Unix time after which the job must not start, and at which a running job is aborted."""
    model: str | None = None
    """Informational: the worker runs its own model; a mismatch is not checked."""
    response_format: ResponseFormat | None = None
    """OpenAI's structured output: ``text``, ``json_object`` or ``json_schema``."""
    structured_outputs: StructuredOutputs | None = None
    """vLLM's constraints beyond OpenAI's: one of ``regex``, ``choice``, ``json``."""
    logprobs: bool = False
    """Return each generated token's logprob (chat-completions style)."""
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """With ``logprobs``: how many of the most likely tokens to list at each position."""
    adapter: str | None = None
    """Name of a LoRA adapter in the worker's ``lora_dir`` to run this job with."""
    metadata: dict[str, str] | None = None
    callback: CeleryCallback | None = None
    """Optional completion callback (a Celery task sent the result when the job finishes)."""

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "deadline")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_nonempty(cls, v: str | list[int] | None) -> str | list[int] | None:
        if v is not None and len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_shape(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings must be 1..{MAX_STOP_LENGTH} characters")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in v)):
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, each >= 0")
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter_name(cls, v: str | None) -> str | None:
        if v is not None and not ADAPTER_NAME.match(v):
            raise ValueError("adapter must be a name (1..128 of A-Z a-z 0-9 _ . -, "
                             "not starting with . _ or -)")
        return v

    @model_validator(mode="after")
    def _features(self) -> JobRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        constrained = self.response_format is not None and self.response_format.type != "text"
        if constrained and self.structured_outputs is not None:
            raise ValueError("give one structured output constraint: response_format or "
                             "structured_outputs, not both")
        return self

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(BaseModel):
    """Unix times in seconds; None where the job never reached that point."""

    queued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool = False


class JobResult(BaseModel):
    """A job's terminal record, written once to its reply key."""

    id: str
    status: JobStatus
    text: str = ""
    token_ids: list[int] | None = None
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token when the request asked for ``logprobs``."""
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    error: JobError | None = None
    worker: str | None = None
    attempts: int = 0
    resumed_at_token: int | None = None
    """Set when this attempt continued an earlier one's output: the completion tokens it
    carried over (generated before the move; ``usage`` counts them too)."""
    restarted: str | None = None
    """Set when a reclaimed job started over instead: why (PROTOCOL.md, "Resume or restart")."""

    @property
    def ok(self) -> bool:
        return self.status is JobStatus.succeeded


def dump(model: BaseModel) -> str:
    return model.model_dump_json(exclude_none=True)


def parse_request_json(raw: str | bytes) -> JobRequest:
    """A request body exactly as the wire carries it, with JSON's own types only: no
    ``"10"`` for 10, no ``"true"`` for true (strict validation); ValidationError otherwise.
    Bytes must be UTF-8."""
    return JobRequest.model_validate_json(raw, strict=True)


def request_from_data(data: dict[str, Any]) -> JobRequest:
    """A request from Python values, held to the same rule as the wire (it goes through
    JSON): ValidationError for a wrong type, ValueError for a value JSON cannot carry
    (NaN, infinity, an object that is not JSON)."""
    try:
        raw = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"request is not JSON: {e}") from None
    return parse_request_json(raw)


def as_request(value: JobRequest | dict[str, Any]) -> JobRequest:
    return value if isinstance(value, JobRequest) else request_from_data(value)
