"""``python -m slotfill`` = the ``slotfill`` command."""

from slotfill.cli.main import app

app()
