# Every target sets up what it needs: a fresh clone runs `make run` or `make test` and nothing else.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
NODE_DIR := clients/node
BUF := $(NODE_DIR)/node_modules/.bin/buf
# The TypeScript client (@entitlements/client): code generated into TS_GEN_DIR by `make ts-protos`, compiled into dist/.
TS_DIR := clients/typescript
TS_GEN_DIR := $(TS_DIR)/src/gen
# What `buf breaking` compares the contract with, "the last released contract": the newest tag contract-v* reachable
# from HEAD (releasing the contract is `git tag contract-vN`), or, before the first release, the commit that first
# added the proto (so every change since it was published must be additive). Needs the history: no shallow clones.
CONTRACT_BASE = $(or $(shell git describe --tags --abbrev=0 --match 'contract-v*' HEAD 2>/dev/null),$(shell git log --diff-filter=A --format=%H -- $(PROTO) 2>/dev/null | tail -n 1))
PROTO := protos/entitlements/v1/entitlements.proto
GEN_DIR := clients/python
# The Python client package (dodo-entitlements-client: the generated stubs and entitlements_client).
PY_CLIENT := clients/python

export PYTHONDONTWRITEBYTECODE := 1


.PHONY: stop-db
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

$(VENV)/.installed: pyproject.toml $(PY_CLIENT)/pyproject.toml $(BIN)/activate
	$(BIN)/pip install --quiet -e ./$(PY_CLIENT) -e '.[dev]'
	@touch $@

install: $(VENV)/.installed node-deps

system-deps:
	@if ! command -v $(PYTHON) >/dev/null || ! command -v npm >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq python3.11 python3.11-venv nodejs npm; fi

# Node: clients/node holds the buf CLI and the example, which links clients/typescript (file:../typescript); the
# TypeScript package is installed from its own lockfile and compiled by tsc (Node 20 runs JavaScript only).
$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || $(MAKE) system-deps
	cd $(NODE_DIR) && npm ci --silent --no-audit --no-fund
	@touch $@

$(TS_DIR)/node_modules/.installed: $(TS_DIR)/package.json $(TS_DIR)/package-lock.json
	@command -v npm >/dev/null || $(MAKE) system-deps
	cd $(TS_DIR) && npm ci --silent --no-audit --no-fund
	@touch $@

$(TS_DIR)/dist/.built: $(TS_DIR)/node_modules/.installed $(TS_DIR)/tsconfig.json $(shell find $(TS_DIR)/src $(TS_DIR)/test -name '*.ts' 2>/dev/null)
	rm -rf $(TS_DIR)/dist
	cd $(TS_DIR) && npm run --silent build
	@touch $@

node-deps: $(NODE_DIR)/node_modules/.installed $(TS_DIR)/dist/.built

# The TypeScript messages and service descriptors (protoc-gen-es, see buf.gen.ts.yaml): committed like the Python
# stubs, never edited by hand; tests/clients/test_typescript_generated_code.py runs this into a temp dir and diffs.
.PHONY: ts-protos breaking
ts-protos: $(NODE_DIR)/node_modules/.installed $(TS_DIR)/node_modules/.installed
	rm -rf $(TS_GEN_DIR)
	$(BUF) generate --template buf.gen.ts.yaml --output $(TS_GEN_DIR)

# Only additive changes since the last released contract (CONTRACT_BASE above).
breaking: $(NODE_DIR)/node_modules/.installed
	@base='$(CONTRACT_BASE)'; \
	if [ -z "$$base" ]; then echo "breaking: no baseline (no contract-v* tag, no history of $(PROTO))" >&2; exit 1; fi; \
	echo "buf breaking --against .git#ref=$$base"; \
	$(BUF) breaking --against ".git#ref=$$base"

protos: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) \
	  --grpc_python_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO)

lint: install
	$(BUF) lint
	@$(MAKE) --no-print-directory breaking
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

# The local Postgres `make run` started under .data/ (DATABASE_URL unset) keeps running between runs.
stop-db:
	@if [ -x $(PY) ]; then $(PY) -m service.dev.localdb stop; fi
