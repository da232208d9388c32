# pgfleet: `make demo` shows a fleet kept inside a backend budget, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help deps venv compiled linktree demo demo-pooler test check lint typecheck pytest pytest-compiled fuzz bench crd clean

help:
	@echo "make demo       three poolers + the budget controller in front of a small PostgreSQL; others"
	@echo "                come and go, the load shifts; a live table and a summary"
	@echo "make demo-pooler  one pooler driven by pgbench: tps, clients, backends"
	@echo "make test       ruff, mypy, import layers, the whole pytest suite, and the pooler's"
	@echo "                tests again against its compiled build"
	@echo "make compiled   build the pooler as the image ships it (hot path compiled by mypyc)"
	@echo "make fuzz       the Hypothesis fuzzing suite at length (FUZZ_EXAMPLES cases per test)"
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

# The pooler as the image ships it: its hot path compiled by mypyc (see setup.py),
# installed apart from the editable .venv so that tests and benchmarks can run either.
# Any source change rebuilds it: the tree is a copy, and a stale copy would be tested.
COMPILED := build/compiled
$(COMPILED)/.stamp: $(STAMP) setup.py pyproject.toml $(wildcard pooler/*.py pooler/protocol/*.py operator/*.py devtools/*.py)
	@PYTHON=$(BIN)/python bash scripts/ensure-deps.sh compiler
	# setuptools ships whatever build/lib holds: a module no longer compiled must not linger.
	rm -rf $(COMPILED) build/lib.* build/bdist.*
	PGFLEET_COMPILE=1 $(BIN)/pip install -q --no-deps --no-build-isolation --target $(COMPILED) .
	touch $@

compiled: $(COMPILED)/.stamp

demo: deps venv
	$(BIN)/python -m pgfleet.devtools.fleetdemo

demo-pooler: deps venv
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

# PGFLEET_EXPECT_COMPILED fails the run unless the compiled modules are the ones imported,
# in the test process and in every pooler it starts (their ready line says which build).
pytest-compiled: deps compiled
	PYTHONPATH=$(CURDIR)/$(COMPILED) PGFLEET_EXPECT_COMPILED=1 $(BIN)/pytest tests/pooler $(PYTEST_ARGS)

test: lint typecheck pytest pytest-compiled

# `make test` runs tests/pooler/test_fuzz.py with a few dozen cases per test; this runs
# thousands (the codec, and a running pooler before and after login).
FUZZ_EXAMPLES ?= 2000
fuzz: deps venv
	PGFLEET_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/pooler/test_fuzz.py -s --timeout 3600 $(PYTEST_ARGS)

check: test

bench: deps venv compiled
	@bash scripts/ensure-deps.sh pgbouncer || true
	$(BIN)/python benchmarks/run.py

crd: venv
	$(BIN)/pgfleet-operator crd > crds/pgpool.yaml

clean:
	rm -rf $(VENV) build .mypy-src .pytest_cache .ruff_cache .mypy_cache .pytest-kind
