"""The light install (``pip install slotfill``): what a backend imports stays light, and the
features the declared dependency floors must provide are there (.ci/floors.sh runs this file
at exactly those versions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from producer.settings import ClientSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent


def test_settings_keep_their_descriptions() -> None:
    """pydantic < 2.7 drops attribute docstrings: README's settings table would be empty."""
    for model in (ClientSettings, WorkerSettings):
        missing = [n for n, f in model.model_fields.items() if not f.description]
        assert not missing, (model.__name__, missing)


def test_the_client_import_loads_no_engine_and_no_shell() -> None:
    code = ("import sys, slotfill; from slotfill import Client, AsyncClient; "
            "print(','.join(m for m in ('typer', 'rich', 'vllm', 'torch', 'prometheus_client', "
            "'celery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "", out.stdout
