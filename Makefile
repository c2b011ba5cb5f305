# Liftoff: `make serve` runs the server, `make test` runs every check. Both work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CACHE  := .cache
STAMP  := $(VENV)/.installed

# Liftoff serve arguments: override on the command line, e.g. `make serve SERVE_ARGS="--port 8000"`.
SERVE_ARGS ?= --model-name echo --device cpu

.PHONY: serve test check lint typecheck unit integration clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

serve: $(STAMP)
	$(BIN)/liftoff serve $(SERVE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

integration: $(STAMP)
	$(BIN)/pytest tests/integration -q

test: check
	$(BIN)/pytest -q --cov --cov-report=term

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
