# `make run` and `make test` each work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
OUT ?= runs/default

export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test test-fast bench assets clean

venv: $(STAMP)

# Pinned torch first (CPU wheel; a bare `torch` requirement would pull CUDA), then the package.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedmoe run --config $(CONFIG) --out $(OUT) --overwrite

# Two pytest-xdist workers: most tests wait on one single-threaded run or MPI job, so one worker
# leaves a core idle. Shared runs are made once under a file lock. Beside the other worker, a
# 2-thread test's OpenMP threads spin at every barrier for a core they do not get: passive
# waiting (no effect on results) keeps that from multiplying its time.
TEST_WORKERS ?= 2
TEST_ENV := OMP_WAIT_POLICY=PASSIVE

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/moe_block.py
	$(PY) bench/tier_step.py
	$(PY) bench/round_overhead.py

# Rebuilds the shipped tiny pretrained OLMoE (minutes on 2 cores); the result is committed.
assets: $(STAMP)
	$(PY) scripts/pretrain_tiny_olmoe.py --out assets/tiny-olmoe

clean:
	rm -rf $(VENV) runs .pytest_cache
