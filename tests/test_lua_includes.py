"""Shared Lua code by explicit includes (``--- @include "includes/name"``, resolved by
producer/scripts.py): every shipped script resolves and compiles on a real Redis; a missing
include or a cycle fails loudly at load; the terminal statuses are written once, in Lua, and
match Python's."""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources

import pytest
import redis

from producer.schema import JobStatus
from producer.scripts import INCLUDE, IncludeError, resolve, shipped, source


def _reader(files: dict[str, str]) -> Callable[[str], str]:
    def read(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]
    return read


def test_every_shipped_script_resolves_and_compiles(r: redis.Redis) -> None:
    names = shipped()
    assert {"start_jobs", "reclaim_jobs", "release_jobs", "finish_job", "submit_job"} <= set(names)
    for name in names:
        text = source(name)
        assert not any(INCLUDE.match(line) for line in text.splitlines()), name
        sha = r.script_load(text)  # compiles it: a bad include would not
        assert r.script_exists(sha) == [True], name


def test_includes_are_inlined_once_each_before_their_user() -> None:
    files = {"main": '--- @include "b"\n--- @include "c"\nlocal x = b() + c()\n',
             "b": '--- @include "base"\nlocal function b() return base end\n',
             "c": '--- @include "base"\nlocal function c() return base end\n',
             "base": "local base = 1\n"}
    text = resolve("main", _reader(files))
    assert text.count("local base = 1") == 1
    assert text.index("local base") < text.index("function b") < text.index("function c")
    assert text.rstrip().endswith("local x = b() + c()")


def test_an_unknown_include_fails_loudly() -> None:
    files = {"main": '--- @include "includes/nope"\nreturn 1\n'}
    with pytest.raises(IncludeError, match=r"includes/nope.*included by main"):
        resolve("main", _reader(files))
    with pytest.raises(IncludeError, match="no Lua file 'no_such_script'"):
        source("no_such_script")


def test_an_include_cycle_fails_loudly() -> None:
    files = {"main": '--- @include "a"\n', "a": '--- @include "b"\n', "b": '--- @include "a"\n'}
    with pytest.raises(IncludeError, match="cycle: main -> a -> b -> a"):
        resolve("main", _reader(files))
    with pytest.raises(IncludeError, match="cycle: self -> self"):
        resolve("self", _reader({"self": '--- @include "self"\n'}))


TERMINAL_LUA = re.compile(r"^local TERMINAL = \{([^}]*)\}", re.M)


def test_the_terminal_statuses_are_written_once_and_match_python() -> None:
    lua = resources.files("producer").joinpath("lua")
    text = lua.joinpath("includes/terminal.lua").read_text("utf-8")
    m = TERMINAL_LUA.search(text)
    assert m is not None
    in_lua = {part.split("=")[0].strip() for part in m.group(1).split(",")}
    assert in_lua == {s.value for s in JobStatus if s.terminal}
    # No other script spells the set out again.
    for name in shipped():
        raw = lua.joinpath(f"{name}.lua").read_text("utf-8")
        assert not all(f'"{s}"' in raw for s in in_lua), name
