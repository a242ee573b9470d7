"""What every route needs: the gateway's clients and settings, the caller's key, the body."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request

from producer import AsyncClient, ClientSettings
from producer.connection import connect_async
from producer.keys import Priority
from slotfill.gateway.errors import APIError, bad_request
from slotfill.gateway.keys import GatewayKeys
from slotfill.gateway.settings import ApiKey, GatewaySettings, hash_key


@dataclass(frozen=True)
class Tenant:
    """The caller, as its API key maps it."""

    name: str
    queue: str
    priority: Priority
    batch_priority: Priority

    @property
    def keys(self) -> GatewayKeys:
        return GatewayKeys(self.queue)


@dataclass
class Gateway:
    settings: GatewaySettings
    client_settings: ClientSettings
    redis: aioredis.Redis
    client: AsyncClient = field(init=False)
    on_abandon: Callable[[], None] = lambda: None
    """Called for each job cancelled because its client left or timed out (a metric)."""
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.client = AsyncClient(self.redis, self.client_settings)

    @classmethod
    def connect(cls, settings: GatewaySettings, client_settings: ClientSettings) -> Gateway:
        # A short connect timeout turns an unreachable Redis into a prompt 503, not a hang.
        r = connect_async(client_settings.redis_url, socket_connect_timeout=2.0,
                          socket_timeout=10.0)
        return cls(settings, client_settings, r)

    def keys(self, queue: str) -> GatewayKeys:
        return GatewayKeys(queue)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` outside the request's task: a request cancelled by its client's
        disconnect can still, e.g., cancel its job."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def abandon(self, job_id: str, queue: str) -> None:
        """Cancel a job nobody will read (its client left, or its request timed out)."""
        self.on_abandon()
        self.spawn(self.client.cancel(job_id, queue=queue))

    def tenant_for(self, authorization: str | None) -> Tenant:
        if not self.settings.api_keys:
            return Tenant("anonymous", self.client_settings.queue, Priority.normal, Priority.low)
        token = ""
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        if not token:
            raise APIError(401, "missing API key (Authorization: Bearer ...)",
                           code="invalid_api_key")
        digest = hash_key(token)
        match: ApiKey | None = None
        for k in self.settings.api_keys:
            if hmac.compare_digest(k.sha256, digest):
                match = k
        if match is None:
            raise APIError(401, "incorrect API key", code="invalid_api_key")
        return Tenant(match.name or match.sha256[:8], match.queue, match.priority,
                      match.batch_priority)


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def tenant(request: Request) -> Tenant:
    return gateway(request).tenant_for(request.headers.get("authorization"))


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    return body


def reject_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise bad_request(f"unknown or unsupported field(s): {', '.join(extra)}",
                          param=extra[0], code="unknown_parameter")


def text(x: Any) -> str:
    """A Redis reply value as text (redis-py types them ``bytes | str``)."""
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
