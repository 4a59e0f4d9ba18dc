"""A persistent ggml CPU threadpool for a llama context (what llama-server does).

Without one, ggml creates and joins its worker threads for every graph, i.e. for
every decoded token.  llama-cpp-python 0.3.36 does not bind these functions, so we
call them through ctypes from the libraries it ships; if anything is missing, the
context keeps ggml's default (and we say so).
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGML_MAX_N_THREADS = 512


class _Params(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


class ThreadPool:
    def __init__(self, ctx: Any, n_threads: int, poll: int = 0) -> None:
        import llama_cpp

        libdir = Path(llama_cpp.__file__).parent / "lib"
        base = ctypes.CDLL(str(libdir / "libggml-base.so"))
        cpu = ctypes.CDLL(str(libdir / "libggml-cpu.so"))
        llama = ctypes.CDLL(str(libdir / "libllama.so"))
        base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
        base.ggml_threadpool_params_default.restype = _Params
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_Params)]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p] * 3
        llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        params = base.ggml_threadpool_params_default(n_threads)
        params.poll = poll
        self._cpu, self._llama, self._ctx = cpu, llama, ctx
        self._pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not self._pool:
            raise OSError("ggml_threadpool_new failed")
        llama.llama_attach_threadpool(ctx, self._pool, self._pool)

    def close(self) -> None:
        if self._pool:
            self._llama.llama_detach_threadpool(self._ctx)
            self._cpu.ggml_threadpool_free(self._pool)
            self._pool = None


def attach(ctx: Any, n_threads: int) -> ThreadPool | None:
    try:
        return ThreadPool(ctx, n_threads)
    except (OSError, AttributeError) as exc:
        log.warning("no persistent threadpool (%s): ggml starts threads per token", exc)
        return None
