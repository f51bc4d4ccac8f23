# One command per chore. `.ci/run` calls `make test` verbatim.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo up test lint typecheck unit integration bench memory soak profile fuzz backtest clean

# Create the virtual environment and install the project with the embedded
# broker/Redis binaries and the dev tools; re-run when pyproject.toml changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

# The engine's per-event rules compiled with mypyc into build/mypyc (leadflow/compiled.py);
# engine/__init__.py uses them only while they match the sources. Re-made when engine/ changes.
COMPILED := build/mypyc/sources.json
$(COMPILED): $(STAMP) $(wildcard engine/*.py)
	$(BIN)/python -m leadflow.compiled

# The example page's analytics.js (@segment/analytics-next, pinned in examples/package-lock.json),
# which the browser test loads in headless Chromium.
EXAMPLES := examples/node_modules/.installed
$(EXAMPLES): examples/package.json examples/package-lock.json
	cd examples && npm ci --no-audit --no-fund --loglevel=error
	touch $(EXAMPLES)

up: $(STAMP) $(EXAMPLES) $(COMPILED)  ## broker + Redis (kept in var/up) + engine + collector + alerts, until Ctrl-C
	$(BIN)/leadflow up

demo: $(STAMP) $(COMPILED)  ## broker + Redis + engine + synthetic stream, live alerts and a summary
	$(BIN)/leadflow demo

test: lint typecheck $(STAMP) $(EXAMPLES) $(COMPILED)  ## ruff, mypy, then every test except slow ones
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(COMPILED)
	$(BIN)/pytest tests/unit

integration: $(STAMP) $(COMPILED)
	$(BIN)/pytest tests/integration

OLIST ?= ../shared/datasets/olist
# Olist's public B2B funnel: history, outcomes and a configuration (leadflow.olist), the
# shipped rules backtested on it, `leadflow tune`'s proposal, and the two compared.
backtest: $(STAMP) $(COMPILED)  ## the Olist backtest and tune: var/backtest/olist/report.html
	$(BIN)/python -m leadflow.olist $(OLIST) var/olist
	$(BIN)/leadflow tune var/olist/events.jsonl --config var/olist/config \
	  --outcomes var/olist/outcomes.csv --out var/tune/olist --mqls-per-week 40
	$(BIN)/leadflow backtest var/olist/events.jsonl --config var/olist/config \
	  --outcomes var/olist/outcomes.csv --against var/tune/olist/config --out var/backtest/olist

clean:
	rm -rf $(VENV) .venv-quix build .pytest_cache .mypy_cache .ruff_cache *.egg-info

QUIX_STAMP := .venv-quix/.installed

# The Quix Streams peer pins an older confluent-kafka: it gets its own environment.
# The peer runs the engine's own rules (engine/), so it needs the engine's libraries too;
# re-made when this file changes.
$(QUIX_STAMP): Makefile
	$(PYTHON) -m venv .venv-quix
	.venv-quix/bin/python -m pip install --quiet quixstreams==3.28.1 numpy==2.4.6 orjson==3.13.0 \
	  msgspec==0.23.0
	touch $(QUIX_STAMP)

bench: $(STAMP) $(QUIX_STAMP) $(COMPILED)  ## the benchmark suite: limits, throughput, memory, peers, latency, collector
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.suite

memory: $(STAMP) $(COMPILED)  ## where each byte of Redis goes per person: one engine run, 1M people laid out
	$(BIN)/python -m benchmarks.memory

soak: $(STAMP) $(COMPILED)  ## 30 minutes at a steady rate; engine RSS and Redis memory sampled (MINUTES=N to shorten)
	$(BIN)/python -m benchmarks.soak --minutes $(or $(MINUTES),30) $(SOAK_ARGS)

profile: $(STAMP) $(COMPILED)  ## leadflow run under py-spy: where the time goes (var/profile.txt)
	$(BIN)/python -m benchmarks.profile

fuzz: $(STAMP) $(COMPILED)  ## the model-based test with fresh seeds for MINUTES (default 10); stops at the first failure
	@end=$$(( $$(date +%s) + 60 * $(or $(MINUTES),10) )); runs=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	  LEADFLOW_MODEL_EXAMPLES=$(or $(EXAMPLES),100) $(BIN)/pytest -q -p no:cacheprovider \
	    tests/integration/test_model.py --hypothesis-seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ') \
	    || exit 1; \
	  runs=$$((runs + 1)); \
	done; echo "fuzz: $$runs runs, no failure"
