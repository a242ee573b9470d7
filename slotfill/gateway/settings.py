"""Gateway settings (environment prefix ``SLOTFILL_GATEWAY_``, also read from ``.env``).

The queue-wide limits (``SLOTFILL_MAX_PENDING``, ``SLOTFILL_RESULT_TTL``, ...) stay in
:class:`producer.ClientSettings`; only what the HTTP front door adds lives here.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.keys import Priority, valid_queue_name


def hash_key(api_key: str) -> str:
    """What the settings store for a key: its SHA-256, hex (keys are long random strings,
    so an unsalted fast hash is enough to keep them out of config files and logs)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


class ApiKey(BaseModel):
    """One API key: who may call, and where its jobs go."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the key, hex (``slotfill gateway --hash-key KEY`` prints it)."""
    name: str = ""
    """Label for logs and metrics."""
    queue: str = "default"
    priority: Priority = Priority.normal
    """Priority of this key's chat, completions and responses jobs."""
    batch_priority: Priority = Priority.low
    """Priority of this key's batch jobs (after interactive traffic, by default)."""

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        if not valid_queue_name(v):
            raise ValueError(f"not a queue name: {v!r}")
        return v


class GatewaySettings(BaseSettings):
    """Settings of one gateway instance."""

    model_config = SettingsConfigDict(env_prefix="SLOTFILL_GATEWAY_", env_file=".env",
                                      extra="ignore", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on."""
    api_keys: list[ApiKey] = Field(default_factory=list)
    """JSON list of ``{"sha256", "name", "queue", "priority", "batch_priority"}``. Empty: no
    authentication, every caller uses ``SLOTFILL_QUEUE`` at ``normal`` priority."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body, except file uploads (413 beyond)."""
    max_file_bytes: int = Field(50 * 1_048_576, ge=1024)
    """Largest uploaded file (``POST /v1/files``); files are kept in Redis."""
    file_ttl: int = Field(7 * 86_400, ge=60)
    """Seconds an uploaded or generated file stays in Redis."""
    request_timeout: float = Field(600.0, gt=0)
    """Longest a non-background request waits for its job; the job is then cancelled (504)."""
    batch_pump_seconds: float = Field(1.0, gt=0)
    """How often each instance advances unfinished batches (submits what the queue refused,
    writes the output files of finished ones)."""
    retry_after_seconds: int = Field(2, ge=1)
    """``Retry-After`` sent with 429 when the queue is full."""

    def queues(self, default_queue: str) -> list[str]:
        return sorted({k.queue for k in self.api_keys} or {default_queue})
