# inspectray — the README's commands. `make run` sets up and runs the main job;
# `make test` sets up and runs the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast test-faults lint format lock clean

setup: $(STAMP) system-deps

# Python dependencies, pinned by constraints.txt (torch 2.15.0 + torchvision 0.29.2
# come from the registry as a matched pair).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

.PHONY: system-deps
system-deps:
	@./scripts/install-system-deps.sh

# The main job: the local cluster serving inspections (Ctrl-C stops it).
run: setup
	$(BIN)/inspectray serve

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# The fault drills and fuzzers alone; prints the fault report (docs/faults.md).
test-faults: setup
	$(BIN)/python -m pytest -m "faults or fuzz"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Re-pin the full dependency tree after changing pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^inspectray' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
