#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the very llama.cpp that llama-cpp-python 0.3.36
# vendors, so that the baseline server runs the same kernels as llmctl's workers.
# The build lives OUTSIDE the repository and is never committed.
#
#   bash tools/build_llama_server.sh [DEST]      # DEST defaults to ~/.cache/llmctl/llama-server
#   JOBS=2 CMAKE_ARGS="..." bash tools/build_llama_server.sh
#
# Afterwards: DEST/bin/llama-server -m models/SmolLM2-135M-Instruct.Q4_1.gguf --port 8090 \
#               --parallel 8 -t 2 -c 4096
# Re-running it when DEST/bin/llama-server exists does nothing.
set -euo pipefail

VERSION=0.3.36     # keep in step with tools/setup.sh and pyproject.toml
DEST=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/llmctl/llama-server}
JOBS=${JOBS:-2}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
[ -x "$PY" ] || PY=python3
# Same CPU flags as tools/setup.sh: these VMs advertise AMX but a native build segfaults in it.
FLAGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}

if [ -x "$DEST/bin/llama-server" ]; then
  echo "already built: $DEST/bin/llama-server"
  exit 0
fi
mkdir -p "$DEST/src"
cd "$DEST/src"
if ! ls llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
  "$PY" -m pip download --no-deps --no-binary :all: -d . "llama-cpp-python==$VERSION"
fi
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "llama_cpp_python-$VERSION.tar.gz"
cd "llama_cpp_python-$VERSION/vendor/llama.cpp"
# shellcheck disable=SC2086
cmake -B build -DCMAKE_BUILD_TYPE=Release $FLAGS -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF
cmake --build build --target llama-server -j"$JOBS"
mkdir -p "$DEST/bin"
cp build/bin/llama-server "$DEST/bin/llama-server"
echo "built: $DEST/bin/llama-server"
"$DEST/bin/llama-server" --version 2>&1 | tail -n 2 || true
