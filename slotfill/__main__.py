"""``python -m slotfill`` = the ``slotfill`` command."""

from slotfill.cli.entry import main

main()
