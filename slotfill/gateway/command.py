"""``slotfill gateway``: serve the OpenAI-compatible API (imports FastAPI only when run)."""

from __future__ import annotations

from typing import Annotated

import typer


def gateway_cmd(
    host: Annotated[str | None, typer.Option(help="address (default: SLOTFILL_GATEWAY_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: SLOTFILL_GATEWAY_PORT)")] = None,
    workers: Annotated[int, typer.Option(
        help="processes (each one its own event loop; ~1-2 ms of CPU per request)")] = 1,
    hash_key: Annotated[str | None, typer.Option(
        "--hash-key", help="print the sha256 to put in SLOTFILL_GATEWAY_API_KEYS for this key, "
        "and exit")] = None,
) -> None:
    """Serve OpenAI's chat, completions, responses, files and batches APIs onto the queue.
    Stateless: run any number behind a load balancer. Settings: SLOTFILL_GATEWAY_*."""
    from slotfill.gateway.settings import GatewaySettings
    from slotfill.gateway.settings import hash_key as digest

    if hash_key is not None:
        print(digest(hash_key))
        return
    try:
        import uvicorn

        from slotfill.gateway.app import create_app
    except ImportError as e:
        raise typer.BadParameter(f"{e}: pip install 'slotfill[gateway]'") from None
    settings = GatewaySettings()
    addr = host if host is not None else settings.host
    at = port if port is not None else settings.port
    if workers > 1:  # each process builds its app from the environment
        uvicorn.run("slotfill.gateway.app:create_app", factory=True, workers=workers,
                    host=addr, port=at, log_level="info", proxy_headers=True)
        return
    uvicorn.run(create_app(settings), host=addr, port=at, log_level="info", proxy_headers=True)
