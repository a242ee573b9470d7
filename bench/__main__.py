"""``python -m bench``: the benchmark (not installed; run it from the repository root)."""

from bench.cli import main

main()
