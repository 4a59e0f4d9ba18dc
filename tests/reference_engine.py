"""The single-slot reference engine of the batching tests: llama-cpp-python's ``Llama``.

Not part of the product: the batching tests compare ``BatchEngine``'s output with what
this engine, one sequence at a time through the high-level API, produces.  It shares the
product's prompt preparation (``Prompting``), sampler chain and prefill rules.
"""
from __future__ import annotations

import logging
import time

from llmctl.common.errors import InternalError
from llmctl.worker.engine import (Event, ModelLoadError, Prompting, Sequence, chat_formatter,
                                  done_stats, prefill_chunk, reusable_prefix)

log = logging.getLogger(__name__)


class Engine(Prompting):
    capacity = 1

    def __init__(self, path: str, n_ctx: int, n_gpu_layers: int, threads: int,
                 n_batch: int) -> None:
        import llama_cpp  # heavy import, only in worker processes

        self._llama_cpp = llama_cpp
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        if n_gpu_layers != 0 and not self.gpu_offload:
            log.warning("n_gpu_layers=%d but this llama-cpp-python build has no GPU offload: "
                        "all layers run on the CPU (rebuild with CMAKE_ARGS=-DGGML_CUDA=on)",
                        n_gpu_layers)
        try:
            self.llm = llama_cpp.Llama(
                model_path=path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=threads,
                n_threads_batch=threads, n_batch=n_batch, flash_attn=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"cannot load model {path}: {exc}") from exc
        self.device = "gpu" if self.gpu_offload and n_gpu_layers != 0 else "cpu"
        self.n_ctx = self.llm.n_ctx()
        self.n_batch = n_batch
        self.model_name = str(self.llm.metadata.get("general.name") or path.rsplit("/", 1)[-1])
        self._model = self.llm._model
        self._vocab = self._model.vocab
        self._formatter = chat_formatter(self._model, self.llm.metadata)
        self.active: Sequence | None = None

    # ---- running --------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return 0 if self.active else 1

    @property
    def runnable(self) -> bool:
        """Is there work that a step would advance (not only paused sequences)?"""
        seq = self.active
        return seq is not None and (seq.prefilled < len(seq.tokens) - 1 or seq.window > 0)

    def grant(self, rid: int, n: int) -> None:
        """The client took ``n`` more TOKEN messages: the sequence may send n more."""
        if self.active is not None and self.active.rid == rid:
            self.active.window += n

    def start(self, seq: Sequence) -> None:
        if self.active is not None:
            raise InternalError("engine is busy: a GENERATE arrived without credit")
        llm = self.llm
        # Reuse the KV cache of the common prefix; the last prompt token is always
        # evaluated alone, like a decoded one, and no 1-token chunk is left before it
        # (worker/slots.py, "Exactness").
        common = 0
        last = len(seq.tokens) - 1
        limit = min(llm.n_tokens, last)
        ids = llm.input_ids
        while common < limit and ids[common] == seq.tokens[common]:
            common += 1
        common = reusable_prefix(common, last)
        llm.n_tokens = common
        seq.cached = seq.prefilled = common
        self.active = seq

    def cancel(self, rid: int) -> Event | None:
        seq = self.active
        if seq is None or seq.rid != rid:
            return None
        return self._finish(seq, "cancelled", flush=False)

    def step(self) -> list[Event]:
        seq = self.active
        if seq is None or not self.runnable:
            return []
        llm = self.llm
        last = len(seq.tokens) - 1
        if seq.prefilled < last:
            k = prefill_chunk(last - seq.prefilled, self.n_batch)
            chunk = seq.tokens[seq.prefilled:seq.prefilled + k]
            llm.eval(chunk)
            seq.prefilled += len(chunk)
            return []
        if seq.prefilled == last:                # the last prompt token, alone
            llm.eval(seq.tokens[last:])
            seq.prefilled += 1
            seq.t_prefill_done = time.monotonic()
            return []
        tok = seq.sampler.sample(llm._ctx, -1)
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            return [self._finish(seq, "stop")]
        seq.generated += 1
        text = seq.stream.push(llm._model.detokenize([tok]))
        if seq.stream.stopped:
            return [Event(seq.rid, text), self._finish(seq, "stop")] if text else [self._finish(seq, "stop")]
        if seq.generated >= seq.max_tokens:
            return [Event(seq.rid, text), self._finish(seq, "length")] if text else [self._finish(seq, "length")]
        llm.eval([tok])
        if text:
            seq.window -= 1
            return [Event(seq.rid, text)]
        return []

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> Event:
        self.active = None
        tail = seq.stream.finish() if flush else ""
        return Event(seq.rid, tail, done_stats(seq, reason))
