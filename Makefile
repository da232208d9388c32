# pgfleet: `make demo` shows the pooler at work, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help deps venv linktree demo test check lint typecheck pytest bench crd clean

help:
	@echo "make demo       start PostgreSQL + pgfleet, drive it with pgbench, print what happened"
	@echo "make test       ruff, mypy, import layers and the whole pytest suite"
	@echo "make bench      pgbench: direct vs pgfleet vs PgBouncer (if installed)"
	@echo "make crd        regenerate crds/pgpool.yaml from the operator's models"

deps:
	@bash scripts/ensure-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: deps venv
	$(BIN)/python -m pgfleet.devtools.demo

# mypy and import-linter cannot see setuptools' package-dir mapping, so they read a
# tree of links that spells the import names out (pgfleet/pooler -> ../../pooler, ...).
linktree:
	@rm -rf .mypy-src && mkdir -p .mypy-src/pgfleet
	@for pkg in pooler operator devtools; do ln -s ../../$$pkg .mypy-src/pgfleet/$$pkg; done

lint: venv linktree
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd .mypy-src && PYTHONPATH=. ../$(BIN)/lint-imports --config ../pyproject.toml

typecheck: venv linktree
	cd .mypy-src && ../$(BIN)/mypy --config-file ../pyproject.toml -p pgfleet

pytest: deps venv
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

check: test

bench: deps venv
	@bash scripts/ensure-deps.sh pgbouncer || true
	$(BIN)/python benchmarks/run.py

crd: venv
	$(BIN)/pgfleet-operator crd > crds/pgpool.yaml

clean:
	rm -rf $(VENV) .mypy-src .pytest_cache .ruff_cache .mypy_cache .pytest-kind
