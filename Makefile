# prefero — `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
HOST ?= 127.0.0.1
PORT ?= 8000
export PREFERO_DATA_DIR ?= .prefero

.PHONY: demo test lint format serve migrate install dev bench bench-import clean help

help:
	@echo "make demo    install into $(VENV), migrate SQLite, seed a demo project, serve on http://$(HOST):$(PORT)"
	@echo "make test    install dev dependencies and run every check (ruff, pytest on SQLite and PostgreSQL)"
	@echo "make bench   run the benchmarks in bench/"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	@touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

migrate: install
	$(VENV)/bin/prefero db upgrade

demo: install migrate
	$(VENV)/bin/prefero seed-demo
	@echo "Serving on http://$(HOST):$(PORT)  (API docs: http://$(HOST):$(PORT)/docs)"
	$(VENV)/bin/prefero serve --host $(HOST) --port $(PORT)

serve: install
	$(VENV)/bin/prefero serve --host $(HOST) --port $(PORT)

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest

bench: bench-import

bench-import: dev
	$(PY) bench/import_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
