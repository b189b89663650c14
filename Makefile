# PyMigrate IoT. `make run` and `make test` are the whole set-up on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
CONFIG ?= configs/default.toml
PYTEST_ARGS ?=

.PHONY: install run test bench lint typecheck fmt clean timescaledb

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if command -v uv >/dev/null 2>&1; then uv venv $(VENV); else python3 -m venv $(VENV); fi; \
	fi
	@if command -v uv >/dev/null 2>&1; then \
	  uv pip install --python $(PY) -e '.[dev]'; \
	else \
	  $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e '.[dev]'; \
	fi
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pymigrate run --config $(CONFIG)

test: $(STAMP)
	rm -f .coverage .coverage.*
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml $(PY) -m pytest \
	  --cov --cov-report=term --cov-fail-under=90 \
	  --json-report --json-report-file=pytest_results.json $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in $$($(PY) -m bench --help | sed -n 's/^benchmarks: //p' | tr ',' ' '); do \
	  echo "== $$b"; \
	  if [ "$$b" = compression ]; then \
	    for d in tests/data/*.csv; do $(PY) -m bench compression --dataset $$d || exit 1; done; \
	  else $(PY) -m bench $$b || exit 1; fi; \
	done

# TimescaleDB 2.28.3 built from ../shared/vendor (TIMESCALEDB_TARBALL overrides) when not
# installed, on its own PostgreSQL 15 cluster (port 5433; 5432 untouched); prints the DSN
# for PYMIGRATE_TEST_TSDB. Needs root. Fast when already done.
timescaledb:
	@bash scripts/timescaledb.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .coverage* pytest_results.json
