# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each (re)creates .venv only when it is missing or its inputs changed (stamp files), so a second run
# installs nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEPS_STAMP := $(VENV)/.deps-stamp
PKG_STAMP := $(VENV)/.pkg-stamp
# Kernel tests run on CPU through the Triton interpreter; extension JIT builds stay inside the build area.
export TRITON_INTERPRET ?= $(shell $(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)" 2>/dev/null || echo 1)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv demo test lint format bench bench-full experiment gpu-check gpu-wheels clean

$(DEPS_STAMP): requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install pip==26.3 setuptools==84.2.1 wheel==0.48.0
	@# The CPU torch wheel first, so that no dependency can pull a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install --no-build-isolation -r requirements.lock
	@touch $@

$(PKG_STAMP): $(DEPS_STAMP) pyproject.toml setup.py $(wildcard csrc/*)
	$(PIP) install --no-build-isolation --no-deps -e .
	@# DeepSpeed JIT-compiles its CPU communication op on first use (~40 s): do it once here, not in the first run.
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" >/dev/null
	@touch $@

venv: $(PKG_STAMP)

demo: venv
	$(PY) -m engine.train

test: lint
	$(PY) -m pytest tests -q

# ruff (pinned in requirements.lock, configured in pyproject.toml): lint and format check; `make format` fixes.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: venv
	$(PY) -m bench.run --quick

bench-full: venv
	$(PY) -m bench.run

experiment: venv
	$(PY) -m experiments.method

# Every GPU figure in one command on a bare CUDA machine (README "Measuring on a GPU"): no `venv`
# prerequisite, since a GPU image brings its own torch (its python3 runs it when there is no .venv).
# DRY_RUN=1 checks the plumbing on a CPU at tiny shapes; OUT_DIR=dir picks the (new or empty) output folder.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PY) -m bench.gpu_check $(if $(filter 1 true yes,$(DRY_RUN)),--dry-run) $(if $(OUT_DIR),--out $(OUT_DIR))

# The wheels gpu-check installs on a GPU machine without network (git-ignored .whl/; needs pip and,
# to build DeepSpeed's pure-Python wheel, a python with torch: the .venv's, or PYTHON=...).
gpu-wheels:
	PYTHON=$(GPU_CHECK_PY) bash bench/fetch_gpu_wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
