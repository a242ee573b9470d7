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


_BATCH_LOOP = """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 0, (#ARGV - 2) / na - 1 do
  local k, a = {}, {}
  for j = 1, nk do k[j] = KEYS[i * nk + j] end
  for j = 1, na do a[j] = ARGV[2 + i * na + j] end
  out[i + 1] = one(k, a) or false
end
return out
"""


@cache
def batched(name: str) -> str:
    """``name`` applied to many calls in one script: ARGV[1] = KEYS per call, ARGV[2] = ARGV
    per call, then every call's ARGV in order (KEYS likewise). Returns each call's reply.

    Replaces a pipeline of EVALSHA, which Redis Cluster clients refuse; every call's keys must
    hash to one slot (one queue's keys do). The transition's text is reused unchanged, so
    the batch cannot drift from the single step."""
    return "local function one(KEYS, ARGV)\n" + source(name) + "\nend\n" + _BATCH_LOOP


def batch_args(calls: list[tuple[list[str], list[str | int | float]]]
               ) -> tuple[list[str], list[str | int | float]]:
    """KEYS and ARGV of a :func:`batched` script for ``calls`` (each ``(keys, args)``, all
    of one shape)."""
    keys: list[str] = []
    args: list[str | int | float] = [len(calls[0][0]), len(calls[0][1])]
    for k, a in calls:
        keys += k
        args += a
    return keys, args
