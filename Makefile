# The two commands of the README: `make demo` and `make test`. Each installs only what it needs
# (scripts/setup.sh demo|test|bench).
VENV := .venv
BIN := $(VENV)/bin
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-test setup-bench demo test test-fast lint typecheck pytest bench compose-check clean

setup:
	@bash scripts/setup.sh demo

setup-test:
	@bash scripts/setup.sh test

setup-bench:
	@bash scripts/setup.sh bench

# Not offline: `make demo ARGS="--model Qwen/Qwen2.5-0.5B-Instruct"` downloads that model.
demo: setup
	$(BIN)/slotfill demo $(ARGS)

lint: setup-test
	$(BIN)/ruff check producer worker slotfill bench tests
	$(BIN)/lint-imports

typecheck: setup-test
	$(BIN)/mypy

# Three pytest-xdist workers: the engine and fault tests stay on one of them, in order, while
# the other two run the logic tests (tests/xdist_kit.py; README, Tests).
pytest: setup-test
	$(BIN)/python -m pytest -q -n 3

test: lint typecheck pytest

# The inner loop: no vLLM, no process kills; three pytest-xdist workers on two cores: its tests
# mostly wait on Redis and timers (README, Tests).
test-fast: setup-test
	$(BIN)/python -m pytest -q -n 3 -m "not engine and not fault"

bench: setup-bench
	$(BIN)/python -m bench $(ARGS)

# redis + worker-cpu from compose.yaml (Docker, else podman + podman-compose), one job from the
# host, a drained stop. Builds images: minutes, so not part of `make test`.
compose-check:
	@bash scripts/compose_check.sh $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
