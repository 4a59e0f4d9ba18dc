#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: .venv, llama-cpp-python built from source with
# flags that work on this machine, the project (editable) with its test tools, and the
# default model.  Re-running it skips whatever is already done.
#
#   LLMCTL_CUDA=1 bash tools/setup.sh   # GPU host: build llama.cpp with CUDA (needs nvcc)
#   CMAKE_ARGS="..." bash tools/setup.sh  # any other llama.cpp build flags
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON_VERSION=0.3.36   # the version llmctl is tested with (also in pyproject.toml)
# These CPUs advertise AMX, but it is unusable in this VM: the native build segfaults in
# ggml_backend_amx_mul_mat.  Build for AVX2 explicitly instead.
CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
CUDA_FLAGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF"
if [ -n "${CMAKE_ARGS:-}" ]; then FLAGS="$CMAKE_ARGS"
elif [ "${LLMCTL_CUDA:-0}" = 1 ]; then FLAGS="$CUDA_FLAGS"
else FLAGS="$CPU_FLAGS"; fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python

# One wheel per (version, flags), cached outside the clone so that a second clone on
# the same machine does not rebuild; pip's own wheel cache ignores CMAKE_ARGS.
KEY=$(printf '%s %s' "$LLAMA_CPP_PYTHON_VERSION" "$FLAGS" | sha256sum | cut -c1-16)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/llmctl/wheels/$KEY"
STAMP=.venv/.llama-cpp-python-build
if [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ]; then
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (CMAKE_ARGS=$FLAGS); this takes several minutes"
    mkdir -p "$WHEELS"
    CMAKE_ARGS="$FLAGS" "$VPY" -m pip wheel --no-deps --no-cache-dir -w "$WHEELS" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  fi
  "$VPY" -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl
  echo "$KEY" > "$STAMP"
fi

"$VPY" -m pip install -q -e '.[test]'
"$VPY" -m llmctl.tools.fetch_model
# The second real model of the multi-model tests: made here from the first (no download).
"$VPY" -m llmctl.tools.requantize
echo "set-up done: .venv ready, models in models/"
