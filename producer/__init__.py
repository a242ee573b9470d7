"""slotfill's client library: enqueue inference jobs on Redis and read their results.

No vLLM, no torch: ``pip install slotfill`` is enough to use it.
"""

from producer.aio import AsyncClient
from producer.client import Client
from producer.errors import (
    EngineDead,
    ErrorCode,
    InvalidRequest,
    JobNotFound,
    PayloadTooLarge,
    QueueFull,
    RedisUnavailable,
    Refused,
    SlotfillError,
    WaitTimeout,
)
from producer.keys import Priority, QueueKeys
from producer.protocol import Job
from producer.schema import (
    CeleryCallback,
    ChatMessage,
    JobRequest,
    JobResult,
    JobStatus,
    Timings,
    Usage,
)
from producer.settings import ClientSettings
from producer.streaming import Moved, Restarted, StreamEvent, TokenDelta

__all__ = [
    "AsyncClient",
    "CeleryCallback",
    "ChatMessage",
    "Client",
    "ClientSettings",
    "EngineDead",
    "ErrorCode",
    "InvalidRequest",
    "Job",
    "JobNotFound",
    "JobRequest",
    "JobResult",
    "JobStatus",
    "Moved",
    "PayloadTooLarge",
    "Priority",
    "QueueFull",
    "QueueKeys",
    "RedisUnavailable",
    "Refused",
    "Restarted",
    "SlotfillError",
    "StreamEvent",
    "Timings",
    "TokenDelta",
    "Usage",
    "WaitTimeout",
]
