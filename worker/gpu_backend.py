"""What a worker says when its layers cannot go to a GPU.

A CUDA build of llama-cpp-python (``LLMCTL_CUDA=1 make setup``) is built with
``GGML_CUDA_NO_VMM``, so it links no part of the NVIDIA driver: on a host without the driver
(no ``libcuda.so.1``) or without a visible device it loads, its CUDA backend reports no
device, and every layer runs on the CPU.  The warning then says which of the two cases it
is: a CPU-only build, or a CUDA build that finds no GPU.
"""
from __future__ import annotations

import os
from typing import Any


def cuda_build(lib_dir: str) -> bool:
    """Was the llama.cpp in ``lib_dir`` (llama_cpp/lib) built with the CUDA backend?"""
    try:
        return any(name.startswith("libggml-cuda") for name in os.listdir(lib_dir))
    except OSError:
        return False


def offload_fallback(ll: Any, n_gpu_layers: int) -> str | None:
    """The warning for layers asked on a GPU that will run on the CPU (None: no fallback)."""
    if n_gpu_layers == 0 or ll.llama_supports_gpu_offload():
        return None
    if cuda_build(os.path.join(os.path.dirname(ll.__file__), "lib")):
        return (f"n_gpu_layers={n_gpu_layers} but this CUDA build of llama.cpp finds no usable "
                "GPU (no NVIDIA driver: libcuda.so.1 missing, or no device visible, e.g. "
                "CUDA_VISIBLE_DEVICES): all layers run on the CPU")
    return (f"n_gpu_layers={n_gpu_layers} but this llama-cpp-python build has no GPU offload: "
            "all layers run on the CPU (build it with CUDA: LLMCTL_CUDA=1 make setup)")
