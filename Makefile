# Every target creates .venv on first use. PyTorch is pinned to the CPU build on local disk.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_TEST := $(VENV)/.stamp-test
STAMP_BENCH := $(VENV)/.stamp-bench
STAMP_DOCS := $(VENV)/.stamp-docs

.PHONY: test bench lint typecheck pytest bench-cost bench-full docs docs-report docs-site clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(STAMP_BENCH): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

$(STAMP_DOCS): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[docs]'
	touch $@

lint: $(STAMP_TEST)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks examples tools

typecheck: $(STAMP_TEST)
	$(BIN)/mypy

pytest: $(STAMP_TEST)
	$(BIN)/python -m pytest tests

test: lint typecheck pytest

# the quick suite: the registry's quick rows at small sizes, a short summary (≤ 5 min on 2 cores)
bench: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks quick

# every suite (QM9 and the larger ones too) at its documented size, every registry row
bench-full: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks all

bench-cost: $(STAMP_BENCH)
	$(BIN)/python benchmarks/step_time.py

# the "Choosing a balancer" page regenerated from runs at the documented budgets (hours on CPU)
docs: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks all --out docs/choosing-a-balancer

# the same page rebuilt from its saved results.json only (seconds)
docs-report: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks --out docs/choosing-a-balancer --report-only

# the docs site (mkdocs.yml) into site/; --strict: any warning (a broken link or reference, an
# unknown ::: target, an unreadable docstring section) fails the build
docs-site: $(STAMP_DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build dist site .pytest_cache .mypy_cache .ruff_cache
