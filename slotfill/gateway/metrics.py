"""Prometheus metrics of one gateway instance (``GET /metrics``)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    """One registry per app, so several gateways can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("slotfill_gateway_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.seconds = Histogram(
            "slotfill_gateway_request_seconds", "request → last byte of the response",
            ["route", "method"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.in_flight = Gauge("slotfill_gateway_in_flight", "requests being answered",
                               registry=self.registry)
        self.abandoned = Counter("slotfill_gateway_jobs_abandoned",
                                 "jobs cancelled because their client left or their request "
                                 "timed out", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]

        async def send_status(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg["status"])
            await send(msg)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = _route(scope)
            self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
            self.metrics.seconds.labels(route, scope["method"]).observe(
                time.perf_counter() - start)


def _route(scope: Scope) -> str:
    """The route's template (``/v1/files/{file_id}``), never the raw path: ids would make
    one series per request."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
