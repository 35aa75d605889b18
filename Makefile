# `make run` and `make test` do all set-up themselves (apt packages, venv, pip) on a fresh Debian 12.
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
PYTEST_ARGS ?=

.PHONY: setup run test lint unit e2e demo bench clean

setup:
	@bash tools/setup.sh

run: setup
	$(BIN)/otelgo-collector --config $(CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy collector receiver processors exporters

# Lint and tests both run; the target fails if either does.
test: setup
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/mypy collector receiver processors exporters extensions || status=1; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) || status=1; \
	exit $$status

unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

e2e: setup
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

demo: setup
	$(BIN)/python tools/demo.py

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .cache
