#!/usr/bin/env bash
# Build the clients of the two systems llmctl implements, from their own sources, to run
# them against llmctl as their users do (docs/seed-clients.md).  This machine reaches no
# code host: pass the source trees (e.g. unpacked from a copy of each repository).
# Nothing here is committed or run by CI; the test suite uses clients written from the
# specs instead.
#
#   bash tools/seed_clients.sh TCP_SRC MPI_SRC [DEST]
#     TCP_SRC  waqasm86/cuda-tcp-llama.cpp   -> DEST/cc50_llm_client  (g++, no CUDA)
#     MPI_SRC  waqasm86/cuda-mpi-llama-scheduler -> DEST/mls  (Open MPI's mpicxx, libcurl)
#   DEST defaults to ~/.cache/llmctl/seed-clients.  Either source may be "-" to skip it.
#
# The MPI scheduler's CUDA post-processing kernel (src/cuda_post.cu, --cuda_post 1) is
# built with nvcc only with MLS_CUDA=1 (a GPU host with the CUDA runtime); otherwise a
# stub returns 0 ms: run it with --cuda_post 0.  Needs: g++, libopenmpi-dev openmpi-bin, libcurl4-openssl-dev (Debian).
#
# Then, against llmctl (`llmctl start`: binary protocol on 8080, HTTP on 8081):
#   DEST/cc50_llm_client --server=127.0.0.1:8080 --prompt "Hello" --max-tokens 32 --iters 20
#   mpirun --allow-run-as-root --oversubscribe -np 2 DEST/mls --server http://127.0.0.1:8081 \
#       --iters 6 --n_predict 16 --inflight 4 --cuda_post 0
set -euo pipefail

TCP_SRC=${1:?usage: seed_clients.sh TCP_SRC MPI_SRC [DEST]}
MPI_SRC=${2:?usage: seed_clients.sh TCP_SRC MPI_SRC [DEST]}
DEST=$(mkdir -p "${3:-${XDG_CACHE_HOME:-$HOME/.cache}/llmctl/seed-clients}" && cd "${3:-${XDG_CACHE_HOME:-$HOME/.cache}/llmctl/seed-clients}" && pwd)

if [ "$TCP_SRC" != - ]; then
  (cd "$TCP_SRC" && g++ -std=c++20 -O2 -Iinclude src/client.cpp src/transport/tcp_transport.cpp \
     -pthread -o "$DEST/cc50_llm_client")
  echo "built: $DEST/cc50_llm_client"
fi

if [ "$MPI_SRC" != - ]; then
  command -v mpicxx >/dev/null || { echo "mpicxx not found: apt-get install libopenmpi-dev openmpi-bin" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if [ "${MLS_CUDA:-0}" = 1 ]; then
    nvcc -O2 -I"$MPI_SRC/include" -c "$MPI_SRC/src/cuda_post.cu" -o "$work/cuda_post.o"
    post="$work/cuda_post.o -L$(dirname "$(command -v nvcc)")/../lib64 -lcudart"
    echo "CUDA post-processing kernel: built with $(command -v nvcc)"
  else
    printf '#include "mls/cuda_post.cuh"\nnamespace mls { double cuda_post_kernel_ms(int) { return 0.0; } }\n' \
      > "$work/cuda_post_stub.cpp"
    post="$work/cuda_post_stub.cpp"
    echo "CUDA post-processing kernel: stubbed (run with --cuda_post 0; MLS_CUDA=1 builds it)"
  fi
  # main.cu is plain C++ apart from its name: compile it as such.
  # shellcheck disable=SC2086
  (cd "$MPI_SRC" && mpicxx -std=c++20 -O2 -Iinclude -Ithird_party -x c++ src/main.cu -x none \
     src/http.cpp src/stats.cpp src/llama_api.cpp src/llama_parse.cpp $post -lcurl \
     -o "$DEST/mls")
  echo "built: $DEST/mls"
fi
