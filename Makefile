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

.PHONY: venv demo test bench bench-full experiment clean

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

test: venv
	$(PY) -m pytest tests -q

bench: venv
	$(PY) -m bench.run --quick

bench-full: venv
	$(PY) -m bench.run

experiment: venv
	$(PY) -m experiments.method

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
