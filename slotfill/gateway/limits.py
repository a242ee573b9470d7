"""Body size limit, checked before a route reads the body (413 in OpenAI's error shape)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slotfill.gateway.errors import error_body

FILE_ROUTES = ("/v1/files",)
"""Uploads get ``max_file_bytes``; every other body ``max_body_bytes``."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body: int, max_file: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_file = max_file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_file if scope["path"] in FILE_ROUTES else self.max_body
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _refuse(send, limit)
            return
        seen = 0
        refused = False

        async def counting() -> Message:
            # A chunked body has no Content-Length: count what arrives.
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    refused = True
                    raise _TooLarge
            return msg

        started = False

        async def tracking(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting, tracking)
        except _TooLarge:
            if not started:
                await _refuse(send, limit)
        except Exception:
            if not refused or started:
                raise
            await _refuse(send, limit)


class _TooLarge(Exception):
    pass


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(error_body(f"request body over the {limit}-byte limit",
                                 "invalid_request_error", "payload_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
