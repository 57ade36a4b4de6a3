#!/usr/bin/env bash
# `make gpu-wheels`: the wheels `make gpu-check` installs on a GPU machine that has no network, into .whl/
# (git-ignored; the device tool carries it with `carry [".whl"]`, at most 64 MiB for the whole tree).
#
# Target: the GPU image (Python 3.12, x86-64, torch 2.11 / triton 3.6 / transformers 5.17 / accelerate
# 1.15 / huggingface-hub 1.33, no deepspeed, trl, datasets, liger-kernel, cut-cross-entropy). Versions are
# pinned to ones whose requirements that image meets (checked from each wheel's Requires-Dist):
#   deepspeed 0.19.8    the engine's DeepSpeed; an sdist on PyPI, built here as a pure-Python wheel with
#                       DS_BUILD_OPS=0 (the engine uses torch's AdamW: no op is JIT-built on the GPU)
#   hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions): DeepSpeed's
#                       requirements missing from the image (typing-extensions is only installed there if
#                       the image's is older: gpu_check never downgrades a package the machine has)
#   trl 1.16.0          transformers>=4.56.2, accelerate>=1.10.1, datasets>=4.7.0, pyarrow>=21
#   datasets 4.8.5      huggingface-hub>=0.25,<2 (the image's 1.33; datasets 5.x needs pyarrow>=24),
#                       with dill 0.4.1 and multiprocess 0.70.19
#   liger-kernel 0.8.5  torch>=2.1.2, triton>=2.3.1
#   cut-cross-entropy 25.1.1 (latest) torch, triton
# flash-attn is left out: its wheel is far over 64 MiB (the engine then runs SDPA; rows say which ran).
#
# Usage: bash bench/fetch_gpu_wheels.sh   (PYTHON: a python with pip and torch, for the DeepSpeed build;
#        WHEEL_DIR: output folder, default .whl). Prints each wheel and the total size.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PINS=(
    hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
    liger-kernel==0.8.5 cut-cross-entropy==25.1.1
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two wheels of one package stop the install
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" "${PINS[@]}"
# DeepSpeed: no wheel on PyPI. --no-build-isolation builds against the caller's torch (setup.py imports
# it); DS_BUILD_OPS=0 compiles nothing, so the wheel is py3-none-any and runs on the GPU image's torch.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-cache-dir \
    -w "$DEST" deepspeed==0.19.8
ls -l "$DEST"/*.whl
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $total bytes ($((total / 1024 / 1024)) MiB) in $DEST (the device tool carries at most 64 MiB)"
