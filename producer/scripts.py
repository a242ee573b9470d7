"""The Lua steps, one per job state transition, loaded from ``producer/lua``.

Code shared between scripts lives in ``producer/lua/includes`` and is pulled in by an explicit
line in the including file (BullMQ's convention)::

    --- @include "includes/terminal"

The loader replaces that line with the named file (``lua/<name>.lua``), itself resolved the
same way. Each file is inlined once per script, at its first include, so a script sees every
definition before it is used; an include that names no file, or a cycle, raises
:class:`IncludeError` when the script is loaded, never a half-built script at run time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from importlib import resources

INCLUDE = re.compile(r'^--- @include "([A-Za-z0-9_./-]+)"[ \t]*$')


class IncludeError(ValueError):
    """A script names an include that does not exist, or includes itself through others."""


def _read(name: str) -> str:
    path = resources.files("producer").joinpath(f"lua/{name}.lua")
    if not path.is_file():
        raise FileNotFoundError(name)
    return path.read_text("utf-8")


def resolve(name: str, read: Callable[[str], str]) -> str:
    """``name``'s text with every include inlined (once each, dependencies first).
    ``read`` maps a name to its raw text (FileNotFoundError for none)."""
    done: set[str] = set()

    def expand(current: str, chain: tuple[str, ...]) -> str:
        if current in chain:
            raise IncludeError("include cycle: " + " -> ".join((*chain, current)))
        try:
            text = read(current)
        except FileNotFoundError:
            via = f" (included by {chain[-1]})" if chain else ""
            raise IncludeError(f"no Lua file {current!r}{via}") from None
        out = []
        for line in text.splitlines(keepends=True):
            m = INCLUDE.match(line.rstrip("\r\n"))
            if m is None:
                out.append(line)
                continue
            included = m.group(1)
            if included not in done:
                body = expand(included, (*chain, current))
                done.add(included)
                out.append(body if body.endswith("\n") else body + "\n")
        return "".join(out)

    return expand(name, ())


def shipped() -> list[str]:
    """Every top-level script (the ``includes`` are parts of scripts, not scripts)."""
    lua = resources.files("producer").joinpath("lua")
    return sorted(p.name[:-4] for p in lua.iterdir() if p.name.endswith(".lua"))


@cache
def source(name: str) -> str:
    """The Lua text of one transition, exactly as sent to Redis (includes inlined)."""
    return resolve(name, _read)


_BATCH_LOOP = """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local batch = {}
local out = {}
for i = 0, (#ARGV - 2) / na - 1 do
  local k, a = {}, {}
  for j = 1, nk do k[j] = KEYS[i * nk + j] end
  for j = 1, na do a[j] = ARGV[2 + i * na + j] end
  -- A call that raises (a record that breaks the step) gets its error as its reply; the
  -- others stand, and so does what they left to the batch's end.
  local ok, reply = pcall(one, k, a, batch)
  if ok then
    out[i + 1] = reply or false
  elseif type(reply) == "table" and reply.err then
    out[i + 1] = redis.error_reply(reply.err)
  else
    out[i + 1] = redis.error_reply(tostring(reply))
  end
end
-- The work the calls deferred to the end of the batch (lua/includes/batch.lua).
for stream, groups in pairs(batch.acks or {}) do
  for group, ids in pairs(groups) do
    redis.call("XACK", stream, group, unpack(ids))
    redis.call("XDEL", stream, unpack(ids))
  end
end
for hash, fields in pairs(batch.counts or {}) do
  for field, n in pairs(fields) do redis.call("HINCRBY", hash, field, n) end
end
return out
"""


@cache
def batched(name: str) -> str:
    """``name`` applied to many calls in one script: ARGV[1] = KEYS per call, ARGV[2] = ARGV
    per call, then every call's ARGV in order (KEYS likewise). Returns each call's reply.

    Replaces a pipeline of EVALSHA, which Redis Cluster clients refuse; every call's keys must
    hash to one slot (one queue's keys do). The transition's text is reused unchanged, so
    the batch cannot drift from the single step; each call gets the batch's shared table
    (``local batch = ...`` in the step; nil when it runs alone) to read what all calls
    read alike once, and to leave acknowledgements and counters to the batch's end
    (lua/includes/batch.lua)."""
    return ("local function one(KEYS, ARGV, ...)\n" + source(name) + "\nend\n"
            + _BATCH_LOOP)


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
