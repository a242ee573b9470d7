"""Client settings (environment prefix ``SLOTFILL_``, also read from ``.env``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Settings shared by producers and workers."""

    model_config = SettingsConfigDict(env_prefix="SLOTFILL_", env_file=".env", extra="ignore",
                                      use_attribute_docstrings=True)

    redis_url: str = "redis://localhost:6379/0"
    """Redis to use; ``rediss://`` for TLS, ``redis://user:password@host`` for ACL users,
    ``redis+sentinel://host:port,host:port/service_name`` (Sentinel's own password:
    ``?sentinel_password=``), ``redis+cluster://host:port,host:port`` (see
    producer/connection.py)."""
    queue: str = "default"
    """Queue name; all its keys share the Redis Cluster hash tag ``{queue}``."""
    max_pending: int = Field(100_000, ge=1)
    """Cap on unfinished jobs (queued + running) per queue. Workers seed it into the queue's
    config (`slotfill:{Q}:config`) when that has none; the submit step reads the cap there,
    never from its caller (`Client.configure_queue` changes it)."""
    result_ttl: int = Field(86_400, ge=1)
    """Seconds a finished job's record and result stay readable."""
    idempotency_ttl: int = Field(86_400, ge=1)
    """Seconds an idempotency key keeps returning the job it first created."""
    max_payload_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted at submit (JSON bytes)."""
    replica_acks: int = Field(0, ge=0)
    """Replicas that must hold each submit before it is acknowledged (``WAIT`` after the
    submit, on the same connection). 1 with a Sentinel-managed master and two replicas: an
    acknowledged submit survives kill -9 of the master (the sentinels promote the replica
    that has the most); a planned switchover also needs writes paused first (README, Redis
    high availability). When fewer confirm in time the submit raises RedisUnavailable (the
    job may exist: resubmit with the same idempotency key). On a cluster the ``WAIT`` goes
    to the master that owns the queue's slot; ``slotfill batch`` honours it too."""
    replica_ack_timeout_ms: int = Field(1000, ge=1)
    """How long a submit waits for ``replica_acks`` replicas."""
    batch_ttl: int = Field(7 * 86_400, ge=60)
    """Seconds a batch's bookkeeping (``slotfill batch``: custom id → job id) is kept after
    its last change; a batch resumed within this time never submits a line twice."""
