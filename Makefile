# The two commands of the README's quick start, and what they need. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-footprint clean

run: $(STAMP)
	$(BIN)/sockd -c config/sockd.yaml

# The soak test runs on its own after the rest: its minute of load would crowd the others.
test: $(STAMP) lint
	$(BIN)/pytest -n 4 -m "not soak"
	$(BIN)/pytest -m soak

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy sockd sockd_bench bench

# The performance tables (minutes; not part of `make test`): see sockd_bench/suite.py. bench/compare.py
# builds the C peers and load generators into build/bench first. A quick check that it all runs:
# make bench BENCH_ARGS="--rounds 1 --seconds 1 tcp-echo"
bench: $(STAMP)
	$(BIN)/python -m sockd_bench.suite $(BENCH_ARGS)

# Memory and start-up alone (a few minutes; no C peers needed): see sockd_bench/footprint.py.
bench-footprint: $(STAMP)
	$(BIN)/python -m sockd_bench.footprint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build/bench .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
