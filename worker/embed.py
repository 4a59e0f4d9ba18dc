"""Embeddings: a second llama_context on the worker's model, in embedding mode.

``[workers] embeddings = true`` gives each worker an ``Embedder``: a context with
``embeddings = true`` whose KV is unified (cells shared by the inputs in progress).  A
request with ``embed`` inputs (``POST /v1/embeddings``) is admitted like any other (a
credit, a slot while it runs).  Each engine step evaluates at most ``n_batch`` tokens of
the embedding requests (oldest first), like a prefill chunk, so a long list never stalls
the generating sequences or the worker's heartbeats for longer than one chunk: several
short inputs, of one request or several, go in one ``llama_decode`` (one sequence id
each), a long one over several steps (its KV kept between them).  The vector of an input is the mean of its tokens' final hidden states
(mean pooling, computed here so that it can span chunks), L2-normalised; the DONE carries
each as base64 of little-endian float32 (OpenAI's ``encoding_format: "base64"``).
"""
from __future__ import annotations

import base64
import ctypes
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from llmctl.common.errors import BadRequest

log = logging.getLogger(__name__)

MAX_SEQS = 32          # inputs evaluated in one llama_decode


@dataclass(eq=False)
class EmbedJob:
    rid: int
    inputs: list[list[int]]                 # each input's tokens
    done: int = 0                           # inputs embedded so far
    pos: int = 0                            # tokens of input ``done`` evaluated so far
    acc: Any = None                         # the sum of that input's hidden states
    sid: int = 0                            # that input's sequence id, while in progress
    vectors: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.monotonic)
    t_prefill_done: float | None = None
    cached: int = 0
    generated: int = 0

    @property
    def n_prompt(self) -> int:
        return sum(len(t) for t in self.inputs)


class Embedder:
    def __init__(self, ll: Any, model: Any, n_ctx: int, n_batch: int, threads: int,
                 kv_params: Any = None) -> None:
        from llama_cpp import _internals

        from llmctl.worker import threadpool
        self._ll = ll
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx + n_batch             # the input in progress and a chunk beside it
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = MAX_SEQS
        cp.kv_unified = True
        cp.embeddings = True
        cp.pooling_type = ll.LLAMA_POOLING_TYPE_NONE   # every token's state; pooled here
        cp.n_threads = cp.n_threads_batch = threads
        if kv_params is not None:               # the generating context's cache types
            kv_params(cp)
        self._ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
        self._pool = threadpool.attach(self._ctx.ctx, threads)
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1)
        self._mem = ll.llama_get_memory(self._ctx.ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_embd = ll.llama_model_n_embd(model.model)

    def set_threads(self, n: int) -> None:
        self._ll.llama_set_n_threads(self._ctx.ctx, n, n)

    def check(self, inputs: list[list[int]]) -> None:
        for i, toks in enumerate(inputs):
            if not toks:
                raise BadRequest(f"input[{i}] is empty")
            if len(toks) > self.n_ctx:
                raise BadRequest(f"input[{i}] is {len(toks)} tokens; at most {self.n_ctx}")

    def drop(self, job: EmbedJob) -> None:
        """A job ends unfinished: the KV of its input in progress goes."""
        if job.pos:
            self._ll.llama_memory_seq_rm(self._mem, job.sid, -1, -1)

    def reset(self) -> None:
        self._ll.llama_memory_clear(self._mem, True)

    def step(self, jobs: list[EmbedJob]) -> list[EmbedJob]:
        """Evaluate the next ``n_batch`` tokens of the jobs' inputs, oldest job first,
        several inputs (of one job or several) in one ``llama_decode``; the jobs that
        are done."""
        import numpy as np

        ll, ctx, b = self._ll, self._ctx.ctx, self._batch.batch
        busy = {j.sid for j in jobs if j.pos}           # inputs in progress keep their id
        free = [sid for sid in range(MAX_SEQS) if sid not in busy]
        spans = []                 # (job, input, start, first batch row, rows, sequence id)
        k = 0
        for job in jobs:
            i, start = job.done, job.pos
            while i < len(job.inputs) and k < self.n_batch:
                if start == 0:
                    if not free:
                        break
                    sid = free.pop(0)
                else:
                    sid = job.sid
                toks = job.inputs[i]
                n = min(len(toks) - start, self.n_batch - k)
                for j in range(n):
                    b.token[k + j], b.pos[k + j], b.n_seq_id[k + j] = toks[start + j], start + j, 1
                    b.seq_id[k + j][0] = sid
                    b.logits[k + j] = True
                spans.append((job, i, start, k, n, sid))
                k += n
                if start + n < len(toks):
                    break              # the batch is full in the middle of this input
                i, start = i + 1, 0
            if k >= self.n_batch or not free:
                break
        b.n_tokens = k
        rc = ll.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for an embedding batch")
        ptr = ctypes.cast(ll.llama_get_embeddings(ctx), ctypes.POINTER(ctypes.c_float))
        states = np.ctypeslib.as_array(ptr, shape=(k, self.n_embd))
        for job, idx, start, row, n, sid in spans:
            part = states[row:row + n].sum(axis=0, dtype=np.float64)
            job.acc = part if job.acc is None else job.acc + part
            if start + n < len(job.inputs[idx]):
                job.pos, job.sid = start + n, sid
                continue
            v = job.acc / len(job.inputs[idx])
            norm = float(np.linalg.norm(v))
            v = v / norm if norm > 0 else v
            job.vectors.append(base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"))
            job.done, job.pos, job.acc = idx + 1, 0, None
            ll.llama_memory_seq_rm(self._mem, sid, -1, -1)
        return [j for j in jobs if j.done == len(j.inputs)]
