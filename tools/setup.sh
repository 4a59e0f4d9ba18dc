#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: .venv, llama-cpp-python built from source with
# flags that work on this machine, the project (editable) with its test tools, and the
# default model.  Re-running it skips whatever is already done.
#
#   LLMCTL_CUDA=1 bash tools/setup.sh   # GPU host: build llama.cpp with CUDA (docs/gpu.md)
#   LLMCTL_CUDA=1 LLMCTL_CUDA_ARCHS="86-real" bash tools/setup.sh   # other GPU architectures
#   CMAKE_ARGS="..." bash tools/setup.sh  # any other llama.cpp build flags
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON_VERSION=0.3.36   # the version llmctl is tested with (also in pyproject.toml)
# These CPUs advertise AMX, but it is unusable in this VM: the native build segfaults in
# ggml_backend_amx_mul_mat.  Build for AVX2 explicitly instead.
CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
# GPU code for compute capability 5.0 (Maxwell: the seeds' GeForce 940M), 6.1 (Pascal),
# 7.5 (Turing), 8.6 (Ampere) and 9.0 (Hopper), and PTX of 7.5 that newer cards compile on
# first use.  CUDA 12 is the last toolkit that targets 5.0.  GGML_CUDA_NO_VMM: the library
# then needs no libcuda.so.1 to load, so a host without the driver falls back to the CPU.
CUDA_ARCHS=${LLMCTL_CUDA_ARCHS:-"50-real;61-real;75;86-real;90-real"}
CUDA_FLAGS="-DGGML_CUDA=on -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS $CPU_FLAGS"
if [ -n "${CMAKE_ARGS:-}" ]; then FLAGS="$CMAKE_ARGS"
elif [ "${LLMCTL_CUDA:-0}" = 1 ]; then FLAGS="$CUDA_FLAGS"
else FLAGS="$CPU_FLAGS"; fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
CUDA_PREFIX=.venv/cuda
# CUDA 12.x from PyPI, for a host without nvcc: compiler parts, runtime, cuBLAS, and the
# CCCL headers (cub, thrust) that ggml's CUDA code includes.
CUDA_PYPI="nvidia-cuda-nvcc-cu12~=12.9.0 nvidia-cuda-runtime-cu12~=12.9.0 nvidia-cublas-cu12~=12.9.0 nvidia-cuda-cccl-cu12~=12.9.0"

# One toolkit under $CUDA_PREFIX, laid out as CMake's FindCUDAToolkit expects it (bin/,
# nvvm/, include/, lib64/ with the unversioned .so links only a toolkit ships), merged
# from a toolkit folder (may be empty) and the PyPI packages in site-packages/nvidia.
# nvcc finds its headers and nvvm/ next to the path it is run by, so links will do.
# Arguments: the toolkit folder ("" = none), then the site-packages/nvidia subfolders.
merge_cuda_prefix() {
  local root=$1 nv d f
  shift
  nv=$("$VPY" -c "import nvidia; print(nvidia.__path__[0])" 2>/dev/null || true)
  rm -rf "$CUDA_PREFIX" && mkdir -p "$CUDA_PREFIX"/{bin,include,lib64}
  for d in $root "${@/#/$nv/}"; do
    [ -d "$d" ] || continue
    [ -d "$d/nvvm" ] && ln -sfn "$d/nvvm" "$CUDA_PREFIX/nvvm"
    for f in "$d"/bin/*; do [ -e "$f" ] && ln -sfn "$f" "$CUDA_PREFIX/bin/"; done
    for f in "$d"/include/*; do
      case "$(basename "$f")" in __init__.py|__pycache__) ;; *) ln -sfn "$f" "$CUDA_PREFIX/include/";; esac
    done
    for f in "$d"/lib/* "$d"/lib64/*; do
      case "$f" in
        *.so.*) ln -sfn "$f" "$CUDA_PREFIX/lib64/"
                [ -e "$CUDA_PREFIX/lib64/$(basename "${f%.so.*}").so" ] || \
                  ln -sfn "$f" "$CUDA_PREFIX/lib64/$(basename "${f%.so.*}").so";;
        *.so|*.a) ln -sfn "$f" "$CUDA_PREFIX/lib64/";;
      esac
    done
  done
  return 0
}

cuda_release() { "$1" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p'; }

# The CUDA compiler: nvcc on PATH or in CUDA_HOME if it targets every architecture of
# CUDA_ARCHS, else CUDA 12.x from PyPI; cuBLAS from PyPI where the toolkit has none.
cuda_toolkit() {
  local nvcc major release root low
  nvcc=$(command -v nvcc || true)
  [ -z "$nvcc" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  low=$(echo "$CUDA_ARCHS" | tr ';' '\n' | sed 's/[^0-9].*//' | awk '$1 < 75' | tr '\n' ' ')
  if [ -n "$nvcc" ]; then
    release=$(cuda_release "$nvcc") && major=${release%%.*}
    if [ "${major:-0}" -ge 13 ] && [ -n "$low" ]; then
      echo "$nvcc is CUDA $major, which no longer targets compute capability below 7.5" \
        "(CUDA_ARCHS has $low): looking for CUDA 12 instead"
      nvcc=""
    fi
  fi
  if [ -z "$nvcc" ]; then
    echo "installing CUDA 12.x from PyPI into .venv ($CUDA_PYPI)"
    # shellcheck disable=SC2086
    "$VPY" -m pip install -q $CUDA_PYPI
    merge_cuda_prefix "" cuda_nvcc cuda_runtime cublas cuda_cccl
    if [ ! -e "$CUDA_PREFIX/bin/nvcc" ]; then
      echo "error: PyPI's CUDA 12 compiler package (nvidia-cuda-nvcc-cu12) ships no nvcc:" \
        "its bin/ holds only: $(ls "$CUDA_PREFIX/bin" | tr '\n' ' ')(no nvcc, cicc," \
        "cudafe++, fatbinary or nvlink), so CUDA 12 cannot compile from PyPI alone." \
        "Install a CUDA 12.x toolkit's nvcc (docs/gpu.md), or build for compute capability" \
        "7.5 and newer with CUDA 13: LLMCTL_CUDA_ARCHS='75;86-real;90-real'." >&2
      exit 3
    fi
    root=""
  else
    # The toolkit nvcc belongs to, as nvcc itself says (it may be a wrapper script).
    root=$(readlink -f "$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')/..")
    if ! ls "$root"/lib64/libcublas.so* "$root"/lib/libcublas.so* >/dev/null 2>&1; then
      echo "$root has no cuBLAS: installing it from PyPI into .venv"
      if [ "$major" -ge 13 ]; then "$VPY" -m pip install -q "nvidia-cublas==$release.*"
      else "$VPY" -m pip install -q "nvidia-cublas-cu12==$release.*"; fi
    fi
    # PyPI's cuBLAS: CUDA 12's in nvidia/cublas, CUDA 13's in the shared nvidia/cu13.
    if [ "$major" -ge 13 ]; then merge_cuda_prefix "$root" "cu$major"
    else merge_cuda_prefix "$root" cublas; fi
  fi
  echo "CUDA compiler: $CUDA_PREFIX/bin/nvcc ($("$CUDA_PREFIX/bin/nvcc" --version | tail -n 1))"
  CUDA_BUILD_FLAGS="-DCMAKE_CUDA_COMPILER=$PWD/$CUDA_PREFIX/bin/nvcc -DCUDAToolkit_ROOT=$PWD/$CUDA_PREFIX"
}

# The CUDA build loads libcudart.so.N and libcublas*.so.N (N = the CUDA major version) by
# name; the library's RPATH is its own folder, so the toolkit's copies are linked there.
# The driver's libcuda.so.1 is the GPU host's (the NVIDIA driver), never installed here.
link_cuda_runtime() {
  local lib f
  [ -d "$CUDA_PREFIX/lib64" ] || return 0       # a system toolkit on the loader's path
  lib=$("$VPY" -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
  for f in "$CUDA_PREFIX"/lib64/libcudart.so.* "$CUDA_PREFIX"/lib64/libcublas*.so.*; do
    [ -e "$f" ] && ln -sfn "$(readlink -f "$f")" "$lib/$(basename "$f")"
  done
  return 0
}

# One wheel per (version, flags), cached outside the clone so that a second clone on
# the same machine does not rebuild; pip's own wheel cache ignores CMAKE_ARGS.
KEY=$(printf '%s %s' "$LLAMA_CPP_PYTHON_VERSION" "$FLAGS" | sha256sum | cut -c1-16)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/llmctl/wheels/$KEY"
STAMP=.venv/.llama-cpp-python-build
if [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ]; then
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl >/dev/null 2>&1; then
    BUILD_FLAGS=$FLAGS
    if [ "${LLMCTL_CUDA:-0}" = 1 ] && [ -z "${CMAKE_ARGS:-}" ]; then
      cuda_toolkit
      BUILD_FLAGS="$FLAGS $CUDA_BUILD_FLAGS"
    fi
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (CMAKE_ARGS=$BUILD_FLAGS); this takes several minutes (CUDA: hours on 2 cores)"
    mkdir -p "$WHEELS"
    CMAKE_ARGS="$BUILD_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)} \
      "$VPY" -m pip wheel --no-deps --no-cache-dir -w "$WHEELS" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  fi
  "$VPY" -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl
  if [ "${LLMCTL_CUDA:-0}" = 1 ] && [ -z "${CMAKE_ARGS:-}" ]; then
    [ -d "$CUDA_PREFIX" ] || cuda_toolkit        # a cached wheel: its runtime libraries
    link_cuda_runtime
  fi
  echo "$KEY" > "$STAMP"
fi

"$VPY" -m pip install -q -e '.[test]'
"$VPY" -m llmctl.tools.fetch_model
# The second real model of the multi-model tests: made here from the first (no download).
"$VPY" -m llmctl.tools.requantize
echo "set-up done: .venv ready, models in models/"
