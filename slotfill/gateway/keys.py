"""Redis key names the gateway adds (files, batch and response bookkeeping).

Kept here rather than in :mod:`producer.keys` because no worker or producer client ever reads
them: they are the gateway's own state, not part of the queue protocol. They follow the same
rule: every key of a queue carries its hash tag ``{queue}``, so a gateway on Redis Cluster
touches one slot per request. The batch itself reuses the protocol's ``batch`` and
``batch_jobs`` keys (the same bookkeeping as ``slotfill batch``).
"""

from __future__ import annotations

from dataclasses import dataclass

from producer.keys import QueueKeys


@dataclass(frozen=True)
class GatewayKeys:
    queue: str

    @property
    def base(self) -> str:
        return f"{QueueKeys.for_queue(self.queue).base}:gw"

    @property
    def q(self) -> QueueKeys:
        return QueueKeys.for_queue(self.queue)

    def file(self, file_id: str) -> str:
        """Hash of one file: ``meta`` (JSON: the OpenAI file object) and ``content`` (bytes).
        TTL: ``file_ttl``."""
        return f"{self.base}:file:{file_id}"

    def response(self, job_id: str) -> str:
        """Hash of a Responses-API request: ``meta`` (JSON: model, created_at, instructions,
        ...). TTL: the queue's ``result_ttl``, like the job it describes."""
        return f"{self.base}:response:{job_id}"

    @property
    def active_batches(self) -> str:
        """Set of gateway batches not yet finalized (each instance advances them)."""
        return f"{self.base}:batches:active"

    def batch_lock(self, batch_id: str) -> str:
        """Short lease (``SET NX PX``): one instance advances a batch at a time."""
        return f"{self.base}:batch:{batch_id}:lock"
