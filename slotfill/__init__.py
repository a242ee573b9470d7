"""slotfill: a Redis-Streams-fed fleet of vLLM workers that keeps the engine's batch full.

The import a backend needs is ``from slotfill import Client`` (or ``AsyncClient``): it loads the
client library only (redis-py and pydantic; no vLLM, no torch), the same names as
``producer`` exports. The packages, by layer:

* ``producer`` — the protocol (key names, job schema, Lua steps, typed errors) and the clients.
* ``worker`` — the worker runtime; ``worker.engines`` (interface, vLLM, simulated, tiny model)
  and ``worker.ops`` (metrics, logging/Sentry, Celery bridge) below it.
* ``slotfill.cli`` — the ``slotfill`` shell commands; ``slotfill.gateway`` — the
  OpenAI-compatible front door.
* ``slotfill.testing`` — the local-fleet kit: a redis-server runner, worker processes, a tiny
  LoRA adapter, the kill soak and its invariant checker.
"""

import producer as _producer
from producer import *  # noqa: F403  (one list of names: producer.__all__)

__all__ = list(_producer.__all__)
