# The two commands of the README: `make run` (the whole system) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint services test-tools setup

run: setup services
	$(BIN)/parking run

test: setup services test-tools lint
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy .

services:
	@scripts/ensure-services

test-tools:
	@scripts/ensure-test-tools

setup: $(BIN)/.installed

$(BIN)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@
