# Every target sets up what it needs: a fresh clone runs `make run` or `make test` and nothing else.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
NODE_DIR := clients/node
BUF := $(NODE_DIR)/node_modules/.bin/buf
PROTO := protos/entitlements/v1/entitlements.proto
GEN_DIR := clients/python

export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help install system-deps node-deps protos lint migrate run serve test bench clean

help:
	@echo "make run    - set everything up and serve (a local Postgres under .data/ when DATABASE_URL is unset)"
	@echo "make test   - set everything up and run the whole suite against a real Postgres"
	@echo "make bench  - benchmarks (prints a table, writes bench-results.json)"
	@echo "make protos - regenerate the Python stubs under clients/python from protos/"
	@echo "make lint   - buf lint, ruff, mypy strict"
	@echo "make migrate - Alembic to head against DATABASE_URL"

# Python: the interpreter comes from the system (apt-get where it is missing), everything else from PyPI.
$(BIN)/activate:
	@command -v $(PYTHON) >/dev/null || $(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed node-deps

system-deps:
	@if ! command -v $(PYTHON) >/dev/null || ! command -v npm >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq python3.11 python3.11-venv nodejs npm; fi

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || $(MAKE) system-deps
	cd $(NODE_DIR) && npm ci --silent --no-audit --no-fund
	@touch $@

node-deps: $(NODE_DIR)/node_modules/.installed

protos: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) \
	  --grpc_python_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO)

lint: install
	$(BUF) lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

migrate: install
	$(PY) -m service migrate

# DATABASE_URL unset: an embedded PostgreSQL under .data/ (started once, reused by later runs).
run: install
	@set -e; \
	if [ -z "$$DATABASE_URL" ]; then export DATABASE_URL="$$($(PY) -m service.dev.localdb start)"; fi; \
	if [ -z "$$DODO_PAYMENTS_WEBHOOK_KEY" ]; then export DODO_PAYMENTS_WEBHOOK_KEY="$$($(PY) -m service.dev.devkey)"; fi; \
	$(PY) -m service migrate; \
	$(PY) -m service banner; \
	exec $(PY) -m service serve

test: install lint
	bash .ci/ensure-postgres
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# h2load (nghttp2-client) is the C load generator for the fixed-body gRPC cases.
bench: install
	@command -v h2load >/dev/null && command -v nghttp >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client; }
	$(PY) -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .mypy_cache .ruff_cache .pytest_cache
