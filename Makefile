# bnfold: the verbs a newcomer needs. Each target creates/uses .venv from the project's own files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
DEV_STAMP := $(VENV)/.dev-installed
SERVE_STAMP := $(VENV)/.serve-installed

.PHONY: help serve test test-fast train verify lint format bench clean system-deps docker-deps

help:
	@echo "make serve   serve models/ on http://127.0.0.1:8000 (KServe V2 + /v1 + web page)"
	@echo "make test    install everything and run the whole test suite"
	@echo "make train   train the default digits model and write models/digits/"
	@echo "make verify  verify models/digits (checksums, BN counts, equivalence)"
	@echo "make lint    ruff check + format check + hadolint"
	@echo "make bench   benchmarks into bench/results/"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(SERVE_STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e ".[serve]"
	touch $@

$(DEV_STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e ".[serve,train,dev,keras]"
	touch $@ $(SERVE_STAMP)

# exec: the server replaces the recipe's shell, so the SIGTERM that make forwards to its child
# (`kill <pid of make serve>`) reaches the server, which drains and exits.
serve: $(SERVE_STAMP)
	BNFOLD_HOST=$${BNFOLD_HOST:-127.0.0.1} exec $(VENV)/bin/bnfold-serve

# System packages the end-to-end tests need (Debian's chromium for the browser test, wrk for the
# benchmark harness); each script is idempotent and returns at once when they are present.
system-deps: docker-deps
	bash scripts/install_browser.sh
	VENV=$(VENV) bash scripts/install_bench_deps.sh

# A Docker engine (dockerd without a bridge network, BuildKit) and the local python:3.11-slim
# stand-in for the image test (tests/deploy/test_image.py); idempotent like the others.
docker-deps:
	bash scripts/docker_engine.sh
	bash scripts/docker_base_image.sh

test: $(DEV_STAMP) system-deps
	$(PY) -m pytest

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -m "not e2e"

train: $(DEV_STAMP)
	$(VENV)/bin/bnfold-train train --name digits --seed 0 --force

verify: $(DEV_STAMP)
	$(VENV)/bin/bnfold-train verify models/digits

# Full benchmark (about 10-15 minutes): results in bench/results/, summary in docs/performance.md.
bench: $(DEV_STAMP) system-deps
	$(PY) -m bench.run

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis runs
