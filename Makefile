# One command per chore. `.ci/run` calls `make test` verbatim.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration bench soak clean

# Create the virtual environment and install the project with the embedded
# broker/Redis binaries and the dev tools; re-run when pyproject.toml changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

demo: $(STAMP)  ## broker + Redis + engine + synthetic stream, live alerts and a summary
	$(BIN)/leadflow demo

test: lint typecheck $(STAMP)  ## ruff, mypy, then every test except slow ones
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

bench: $(STAMP)  ## throughput of the real dataflow beside a pass-through flow
	$(BIN)/python -m benchmarks.throughput
