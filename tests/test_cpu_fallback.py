"""A worker asked for GPU layers on a host or build without a GPU says why and runs on the
CPU (worker/gpu_backend.py)."""
from __future__ import annotations

import types

from llmctl.worker.gpu_backend import cuda_build, offload_fallback


def fake_llama_cpp(tmp_path, libs, offload):
    pkg = tmp_path / "llama_cpp"
    (pkg / "lib").mkdir(parents=True)
    for name in libs:
        (pkg / "lib" / name).write_bytes(b"")
    return types.SimpleNamespace(__file__=str(pkg / "__init__.py"),
                                 llama_supports_gpu_offload=lambda: offload)


def test_cpu_build_says_to_build_with_cuda(tmp_path):
    ll = fake_llama_cpp(tmp_path, ["libllama.so", "libggml-cpu.so"], offload=False)
    msg = offload_fallback(ll, -1)
    assert msg.startswith("n_gpu_layers=-1 but this llama-cpp-python build has no GPU offload")
    assert "LLMCTL_CUDA=1 make setup" in msg


def test_cuda_build_without_driver_names_libcuda(tmp_path):
    ll = fake_llama_cpp(tmp_path, ["libllama.so", "libggml-cuda.so"], offload=False)
    assert cuda_build(str(tmp_path / "llama_cpp" / "lib"))
    msg = offload_fallback(ll, 12)
    assert msg.startswith("n_gpu_layers=12 but this CUDA build of llama.cpp finds no usable GPU")
    assert "libcuda.so.1 missing" in msg and "all layers run on the CPU" in msg


def test_no_warning_when_layers_go_to_the_gpu_or_none_are_asked(tmp_path):
    assert offload_fallback(fake_llama_cpp(tmp_path, [], offload=True), -1) is None
    assert offload_fallback(fake_llama_cpp(tmp_path / "b", [], offload=False), 0) is None
    assert not cuda_build(str(tmp_path / "missing"))

