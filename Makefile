# fusionrank — every command takes the catalogue directory as DATA (default: the bundled sample).
#   make demo                      build artifacts from the bundled sample and serve them
#   make test                      create .venv, install, run the whole test suite
#   make compose-test              build the images and run the whole stack in Docker
#   make eval DATA=../shared/data/fashion
#   make artifacts DATA=... [REDIS_URL=redis://127.0.0.1:6379/0]
#   make serve [HOST=127.0.0.1 PORT=8000 REDIS_URL=...]

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data/sample
ARTIFACTS ?= artifacts
HOST ?= 127.0.0.1
PORT ?= 8000
REDIS_URL ?=
PYTEST_ARGS ?=

export FUSIONRANK_ARTIFACTS_DIR ?= $(ARTIFACTS)
export FUSIONRANK_HOST ?= $(HOST)
export FUSIONRANK_PORT ?= $(PORT)
ifneq ($(strip $(REDIS_URL)),)
export FUSIONRANK_REDIS_URL := $(REDIS_URL)
endif

.PHONY: help install demo test compose-test eval artifacts serve lint clean

help:
	@sed -n '1,8p' Makefile

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[offline,dev]'
	touch $@

install: $(VENV)/.installed

# Build from the bundled sample (embedded feature store: no server needed), then serve.
demo: artifacts
	@echo
	@echo "fusionrank is starting on http://$(HOST):$(PORT) (Ctrl-C stops it): open that address"
	@echo "in a browser for the search page, or try:"
	@echo "  curl -s http://$(HOST):$(PORT)/readyz"
	@echo "  curl -s -X POST http://$(HOST):$(PORT)/rank -H 'content-type: application/json' \\"
	@echo "       -d '{\"query\": \"red t-shirt for men\", \"top_k\": 5}'"
	@echo
	$(BIN)/python -m service

serve: install
	$(BIN)/python -m service

eval: install
	$(BIN)/python -m models eval --data $(DATA) --out $(ARTIFACTS)

# train (when no checkpoint fits the catalogue) -> ONNX export -> publish features; idempotent.
artifacts: install
	$(BIN)/python -m export --data $(DATA) --out $(ARTIFACTS) $(if $(strip $(REDIS_URL)),--redis-url $(REDIS_URL),)

test: install
	@bash .ci/ensure-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole stack in Docker: base images from Debian's packages, the cpu and trainer images,
# docker compose up on the sample, requests through nginx, a replica killed, Redis restarted,
# down -v (tests/deploy/test_compose_stack.py). Needs root or a running dockerd; skips, saying
# why, where no engine can run.
compose-test: install
	@bash .ci/ensure-tools
	@bash .ci/ensure-docker
	FUSIONRANK_COMPOSE_TEST=1 $(BIN)/python -m pytest -s -m compose $(PYTEST_ARGS) \
		tests/deploy/test_compose_stack.py

lint: install
	$(BIN)/ruff check models export service loadtest tests
	$(BIN)/ruff format --check models export service loadtest tests

clean:
	rm -rf $(ARTIFACTS) .cache .pytest_cache

# make bench [DATA=<catalogue dir>]: the service (1 and 2 workers) and a naive baseline under the
# same open-loop load (full catalogue by default; builds or reuses its artifacts, publishes its
# features to Redis under their own prefix) -> $(ARTIFACTS)/bench/report.{json,md}, latency.png.
BENCH_DATA ?= $(if $(filter file,$(origin DATA)),../shared/data/fashion,$(DATA))
BENCH_REDIS_URL ?= $(or $(strip $(REDIS_URL)),redis://127.0.0.1:6379/0)
BENCH_ARGS ?=
.PHONY: bench
bench: install
	@test -f "$(BENCH_DATA)/products.csv" || { echo "make bench: no catalogue at $(BENCH_DATA)" \
	  "(no products.csv): pass the catalogue directory, e.g. make bench DATA=../shared/data/fashion" >&2; \
	  exit 2; }
	@bash .ci/ensure-tools
	$(BIN)/python -m loadtest.bench --data $(BENCH_DATA) --artifacts $(ARTIFACTS) \
	  --redis-url $(BENCH_REDIS_URL) $(BENCH_ARGS)
