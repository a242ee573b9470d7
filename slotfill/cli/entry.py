"""The ``slotfill`` executable: the shell commands, or one line naming the extra they need.

Kept free of third-party imports so that a light install (``pip install slotfill``: the client
only) gets a hint instead of a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        import rich  # noqa: F401
        import typer  # noqa: F401
    except ModuleNotFoundError as e:
        sys.stderr.write(
            f"slotfill: the shell commands need the 'cli' extra (missing module {e.name!r}); "
            "install it: pip install 'slotfill[cli]' (workers: 'slotfill[worker]' or "
            "'slotfill[worker-cpu]')\n")
        raise SystemExit(4) from None
    from slotfill.cli.main import run

    run()
