"""``python -m bench`` = ``slotfill bench``."""

from bench.cli import main

main()
