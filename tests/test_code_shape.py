"""The code stays walkable: no module of the runtime, the protocol or the shell tools over
400 lines, no function over 60 (issue 11). A function's length counts from its ``def`` (its
decorators excluded) to its last line, docstring and comments included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("producer", "worker", "slotfill")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    return out


def test_the_check_sees_the_packages() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"worker/feeder.py", "producer/scripts.py", "slotfill/cli/main.py"} <= names


def test_no_module_over_400_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _modules()
            if (n := len(p.read_text("utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, long


def test_no_function_over_60_lines() -> None:
    long = [line for p in _modules() for line in _long_functions(p)]
    assert not long, long
