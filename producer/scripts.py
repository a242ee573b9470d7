"""The Lua steps, one per job state transition, loaded from ``producer/lua``."""

from __future__ import annotations

from functools import cache
from importlib import resources

WORKER_SCRIPTS = ("start_jobs", "reclaim_jobs")
"""Scripts that share ``_common.lua`` (prepended at load)."""


@cache
def source(name: str) -> str:
    """The Lua text of one transition, exactly as sent to Redis."""
    text = resources.files("producer").joinpath(f"lua/{name}.lua").read_text("utf-8")
    if name in WORKER_SCRIPTS:
        common = resources.files("producer").joinpath("lua/_common.lua").read_text("utf-8")
        text = common + "\n" + text
    return text
