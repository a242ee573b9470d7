"""slotfill: a Redis-Streams-fed fleet of vLLM workers that keeps the engine's batch full.

The import a backend needs is ``from slotfill import Client`` (or ``AsyncClient``): it loads the
client library only (redis-py and pydantic; no vLLM, no torch). The packages, by layer:

* ``producer`` — the protocol (key names, job schema, Lua steps, typed errors) and the clients.
* ``worker`` — the worker runtime; ``worker.engines`` (interface, vLLM, simulated, tiny model)
  and ``worker.ops`` (metrics, logging/Sentry, Celery bridge) below it.
* ``slotfill.cli`` — the ``slotfill`` shell commands.
* ``slotfill.testing`` — the local-fleet kit: a redis-server runner, worker processes, a tiny
  LoRA adapter, the kill soak and its invariant checker.
"""

from producer import (
    AsyncClient,
    Client,
    ClientSettings,
    EngineDead,
    ErrorCode,
    InvalidRequest,
    Job,
    JobNotFound,
    JobRequest,
    JobResult,
    JobStatus,
    Moved,
    PayloadTooLarge,
    Priority,
    QueueFull,
    Restarted,
    SlotfillError,
    StreamEvent,
    TokenDelta,
    WaitTimeout,
)

__all__ = [
    "AsyncClient",
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
    "Restarted",
    "SlotfillError",
    "StreamEvent",
    "TokenDelta",
    "WaitTimeout",
]
