"""Redis command counts from ``INFO commandstats`` (commands run inside Lua scripts count too)."""

from __future__ import annotations

from typing import Any

import redis

OWN = frozenset({"info", "hgetall", "ping", "config|get", "config"})
"""What the bench itself sends while it watches (left out of the per-job counts)."""


def command_calls(r: redis.Redis) -> dict[str, int]:
    info: dict[str, Any] = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def delta(before: dict[str, int], after: dict[str, int],
          exclude: frozenset[str] = OWN) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in sorted(out.items()) if v and k not in exclude}


def per_job(d: dict[str, int], jobs: int) -> dict[str, Any]:
    """Total commands per job, top-level round trips (scripts and plain calls the clients
    sent) and the per-command breakdown."""
    scripts = d.get("evalsha", 0) + d.get("eval", 0)
    total = sum(d.values())
    return {"jobs": jobs, "commands_per_job": total / max(jobs, 1),
            "script_calls_per_job": scripts / max(jobs, 1),
            "by_command": {k: round(v / max(jobs, 1), 3) for k, v in d.items()}}
