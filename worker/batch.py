"""Continuous batching: many sequences on one llama_context, stepped together.

One ``llama_context`` holds ``slots`` sequences (``n_seq_max = slots``); sequence id
``i`` is slot ``i``.  KV layout: ``kv_unified = false`` (the default) gives every slot
its own KV stream of ``n_ctx`` cells (``n_ctx = slots x n_ctx`` in all), so attention
of a sequence only reads its own cells and a long sequence never crowds another out.
The price: llama.cpp splits a batch into one micro-batch per run of *consecutive*
sequence ids (so tokens go in in slot order), and a prefix copied between two slots
copies the whole stream buffer.
``kv_unified = true`` shares one buffer of ``slots x n_ctx`` cells: copies are free
(cells are shared between sequences), any mix of sequences goes in one micro-batch,
but every token's attention spans all used cells, interleaved with the others', and
the attention of k decoding sequences is one k-column product.  On the CPU build both
layouts are as fast (docs/benchmarks.md, "Where the time goes"), but greedy output
drifts from the single-slot path (4 of 6 test prompts differ within 48 tokens;
worker/slots.py, "Exactness"), so streams are the default.

A ``step()`` is one ``llama_decode`` of one token for each decoding sequence that
has token credit (``window``), then one ``llama_decode`` of at most ``n_batch``
prompt tokens of the oldest sequence in prefill; so new requests join between steps
and a long prompt never stalls the running streams for more than one chunk.

The slots, their KV and the prompt cache behind them are ``worker/slots.py``'s
(``SlotCache``); which token of a prompt is prefilled when is explained there
("Exactness").

Speculation (``spec_max_draft`` > 0): a sequence's pending token and its draft (n-gram
lookup, or a draft model's: ``worker/draft_model.py``) go in the step's batch, all with
logits, and ``_take`` keeps the draft's verified prefix; why that yields exactly the
tokens decoding one at a time yields is ``worker/speculate.py``'s docstring.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from llmctl.common.errors import BadRequest, InternalError, LlmctlError
from llmctl.common.messages import ComputeThreads, KvStoreStats
from llmctl.common.request import GenRequest
from llmctl.worker.embed import EmbedJob, Embedder
from llmctl.worker.gpu_backend import offload_fallback
from llmctl.worker import threadpool
from llmctl.worker.compute_threads import ThreadGovernor, usable_cpus
from llmctl.worker.slots import Slot, SlotCache
from llmctl.worker.kv_params import context_kv_params
from llmctl.worker.speculate import Adaptive, Drafter
from llmctl.worker.draft_model import DraftModel
from llmctl.worker.engine import (Event, ModelLoadError, Prompting, Sequence, chat_formatter,
                                  done_stats, load_model, model_props, prefill_chunk,
                                  token_logprobs)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Seq(Sequence):
    slot: "Slot | None" = None
    pending: int | None = None             # next to decode: the last prompt token, then
                                           # each sampled (and sent) one
    last_slot: int = -1                    # the slot it ran in last
    drafter: Adaptive | None = None        # its drafts (None: no speculation)


class BatchEngine(Prompting):
    seq_class = Seq

    def __init__(self, path: str, n_ctx: int, n_gpu_layers: int, threads: int, n_batch: int,
                 slots: int = 1, prompt_cache: bool = True, kv_unified: bool = False,
                 prompt_cache_bytes: int = 0, embeddings: bool = False,
                 threads_policy: str = "adaptive", spec_max_draft: int = 0,
                 cache_type_k: str = "f16", cache_type_v: str = "f16",
                 flash_attn: str = "auto", draft: tuple[str, str, int] | None = None) -> None:
        import llama_cpp  # heavy import, only in worker processes
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)
        self._ll = ll = llama_cpp
        self.gpu_offload = bool(ll.llama_supports_gpu_offload())
        fallback = offload_fallback(ll, n_gpu_layers)
        if fallback:
            log.warning("%s", fallback)
        self._model = load_model(ll, path, n_gpu_layers, f"cannot load model {path}")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * slots
        cp.n_batch = cp.n_ubatch = max(n_batch, slots)   # a prefill chunk, or a token per slot
        cp.n_seq_max = slots
        cp.kv_unified = kv_unified
        cp.n_threads = cp.n_threads_batch = threads
        # Flash attention: "auto" (llama.cpp's choice) is on wherever the device has the
        # kernel, the CPU included, as in the reference engine of the determinism tests.
        kv_params = context_kv_params(ll, cache_type_k, cache_type_v, flash_attn)
        kv_params(cp)
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=False)
        except ValueError as exc:
            raise ModelLoadError(f"cannot create a context of {slots} x {n_ctx}: {exc}") from exc
        self._pool = threadpool.attach(self._ctx.ctx, threads)
        self._batch = _internals.LlamaBatch(n_tokens=cp.n_batch, embd=0, n_seq_max=1)
        self._rows = cp.n_batch
        self.spec_max_draft = spec_max_draft       # 0: no speculation
        self.cache = SlotCache(ll, self._ctx, slots, kv_unified, prompt_cache, prompt_cache_bytes)
        self.draft_model = None if draft is None else DraftModel(
            ll, *draft, self._model, n_ctx, slots, max(n_batch, slots * (spec_max_draft + 1)),
            threads, kv_params)
        self.device = "gpu" if self.gpu_offload and n_gpu_layers != 0 else "cpu"
        self.n_ctx = ll.llama_n_ctx_seq(self._ctx.ctx) if not kv_unified else n_ctx
        self.n_batch = n_batch
        metadata = self._model.metadata()
        self.model_name = str(metadata.get("general.name") or path.rsplit("/", 1)[-1])
        self._vocab = self._model.vocab
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._formatter = chat_formatter(self._model, metadata)
        self.props = model_props(self._model, metadata, path)
        self.embedder = Embedder(ll, self._model, n_ctx, max(n_batch, 2), threads, kv_params) \
            if embeddings else None
        adaptive = threads_policy == "adaptive"
        self.threads = ThreadGovernor(self._set_threads,
                                      min(threads, usable_cpus()) if adaptive else threads,
                                      adaptive)
        if self.threads.n != threads:
            self._set_threads(self.threads.n)
        self.embedding: dict[int, EmbedJob] = {}   # rid -> embedding request
        self.running: dict[int, Seq] = {}          # rid -> sequence, in start order
        self.parked: dict[int, Seq] = {}           # rid -> sequence without a slot

    # ---- the Engine interface ---------------------------------------------------------
    @property
    def capacity(self) -> int:
        return len(self.cache.slots)

    @property
    def free_slots(self) -> int:
        return len(self.cache.slots) - len(self.running) - len(self.embedding)

    @property
    def active(self) -> Seq | None:
        """The oldest running sequence (the single-slot Engine's attribute)."""
        return next(iter(self.running.values()), None)

    @property
    def runnable(self) -> bool:
        """Is there work that a step would advance (not only paused sequences)?"""
        return bool(self.embedding) or any(s.prefilled < len(s.tokens) - 1 or s.window > 0
                                           for s in self.running.values())

    def grant(self, rid: int, n: int) -> None:
        """The client took ``n`` more TOKEN messages: the sequence may send n more."""
        seq = self.running.get(rid) or self.parked.get(rid)
        if seq is not None:
            seq.window += n

    def prepare(self, rid: int, req: GenRequest) -> Any:
        if req.embed is None:
            seq = super().prepare(rid, req)
            if self.spec_max_draft and req.speculative:
                seq.drafter = Drafter(seq.tokens, self.spec_max_draft) if not self.draft_model \
                    else self.draft_model.drafter(seq.tokens, self.spec_max_draft)
            return seq
        if self.embedder is None:
            raise BadRequest("this service serves no embeddings: set [workers] embeddings = true")
        job = EmbedJob(rid, [self._model.tokenize(t.encode("utf-8"), add_bos=True, special=False)
                             for t in req.embed])
        self.embedder.check(job.inputs)
        return job

    def start(self, seq: Any) -> None:
        if not self.free_slots or seq.rid in self.running or seq.rid in self.embedding:
            raise InternalError("engine is busy: a GENERATE arrived without credit")
        if isinstance(seq, EmbedJob):
            self.embedding[seq.rid] = seq
            return
        seq.cached = seq.prefilled = self._place(seq)

    def _place(self, seq: Seq) -> int:
        """Put ``seq`` in a free slot (worker/slots.py); returns how many tokens (at most
        all but the last) its KV holds."""
        seq.slot, n = self.cache.place(seq, seq.tokens, seq.hashes, seq.cache_prompt,
                                       seq.id_slot)
        seq.last_slot = seq.slot.id
        seq.prefilled = n
        if n == len(seq.tokens) - 1:
            seq.pending = seq.tokens[-1]       # nothing to prefill: it joins the next step
        self.running[seq.rid] = seq
        return n

    def park(self, rid: int, yields: bool = False) -> bool:
        """Free the slot of a decoding sequence, keeping the sequence: one that waits for
        token credit, or (``yields``) one that yields its slot to waiting work.

        Its slot keeps the KV (prompt and generated tokens) as a prompt-cache entry,
        saved to the host store when the slot is reused; ``resume`` finds it there and
        the sequence goes on exactly where it stopped.  False if ``rid`` is not a
        decoding sequence (or, not yielding, one that still has credit)."""
        seq = self.running.get(rid)
        if seq is None or seq.pending is None or seq.slot is None \
                or (seq.window > 0 and not yields):
            return False
        slot = seq.slot
        seq.tokens = [*slot.tokens, seq.pending]   # what the KV must hold, then the next token
        seq.pending, seq.slot = None, None
        seq.cache_prompt = True                    # resuming finds its own KV
        self.cache.park(slot)
        del self.running[rid]
        self.parked[rid] = seq
        return True

    def resume(self, rid: int) -> None:
        """Run a parked sequence again, in a free slot (its KV from the cache if kept)."""
        seq = self.parked.get(rid)
        if seq is None:
            raise InternalError(f"request {rid} is not parked here")
        if not self.free_slots:
            raise InternalError("engine is busy: a RESUME arrived without credit")
        del self.parked[rid]
        self._place(seq)

    def cancel(self, rid: int) -> Event | None:
        job = self.embedding.pop(rid, None)
        if job is not None:
            assert self.embedder is not None
            self.embedder.drop(job)
            return Event(rid, done=done_stats(job, "cancelled"))
        seq = self.running.get(rid) or self.parked.get(rid)
        if seq is None:
            return None
        return self._finish(seq, "cancelled", flush=False)

    def step(self) -> list[Event]:
        """One token for every decoding sequence with credit, then one prefill chunk."""
        events: list[Event] = []
        decoding = [s.seq for s in self.cache.slots if s.seq is not None
                    and s.seq.pending is not None and s.seq.window > 0]
        if decoding:
            events += self._decode(self._drafts(decoding))
        seq = next((s for s in self.running.values() if s.prefilled < len(s.tokens) - 1), None)
        if seq is not None:
            k = prefill_chunk(len(seq.tokens) - 1 - seq.prefilled, self.n_batch)
            toks = seq.tokens[seq.prefilled:seq.prefilled + k]
            events += self._decode([(seq, toks, 0)])
        if self.embedding:
            events += self._embed()
        self.threads.after_step()
        return events

    def _set_threads(self, n: int) -> None:
        """Compute with ``n`` threads from the next graph on (compute_threads.py)."""
        self._ll.llama_set_n_threads(self._ctx.ctx, n, n)
        for other in filter(None, (self.embedder, self.draft_model)):
            other.set_threads(n)

    def _embed(self) -> list[Event]:
        """One chunk of the embedding requests' inputs; the DONEs of those it finished."""
        assert self.embedder is not None
        jobs = list(self.embedding.values())
        try:
            finished = self.embedder.step(jobs)
        except Exception as exc:   # these requests fail, not the engine
            log.exception("embedding requests %s failed", [j.rid for j in jobs])
            self.embedding.clear()
            self.embedder.reset()
            return [Event(j.rid, error=InternalError(f"embedding failed: {exc}")) for j in jobs]
        events = []
        for job in finished:
            del self.embedding[job.rid]
            job.t_prefill_done = time.monotonic()
            events.append(Event(job.rid, done=msgspec.structs.replace(
                done_stats(job, "stop"), embeddings=job.vectors)))
        return events

    def _drafts(self, decoding: list[Seq]) -> list[tuple[Seq, list[int], int]]:
        """Each decoding sequence's pending token and draft: at most the batch's free
        rows in all, and no more than its token credit and ``max_tokens`` let it send
        after the pending token's; n-gram lookups, or the draft model's for all at once."""
        spare, model = self._rows - len(decoding), self.draft_model
        drafts: list[list[int]] = []
        asks: list[tuple[int, Any]] = []           # (index, (slot id, drafter, k))
        for seq in decoding:
            d: Any = seq.drafter
            k = d.length(min(spare, seq.window - 1, seq.max_tokens - seq.generated - 1),
                         len(decoding)) if d is not None else 0
            if k and model is not None:
                asks.append((len(drafts), (seq.slot.id, d, k)))
            drafts.append(d.lookup(k) if k and model is None else [])
            spare -= len(drafts[-1]) if model is None else k
        for (i, _), draft in zip(asks, model.draft([a for _, a in asks]) if asks else ()):
            drafts[i] = draft
        return [(s, [s.pending, *d], 1 + len(d)) for s, d in zip(decoding, drafts)]

    def _decode(self, work: list[tuple[Seq, list[int], int]]) -> list[Event]:
        """One llama_decode of ``(sequence, tokens, rows with logits)``: a prefill chunk
        (0), the pending token (1), or the pending token and a draft (1 + draft); the
        rows with logits are sampled."""
        b = self._batch.batch
        n, outputs = 0, []
        for seq, toks, out in work:       # increasing sequence ids (see the module docstring)
            pos = len(seq.slot.tokens)
            for i, tok in enumerate(toks):
                b.token[n] = tok
                b.pos[n] = pos + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.slot.id
                b.logits[n] = i >= len(toks) - out
                n += 1
            if out:
                outputs.append((n - out, seq, toks[len(toks) - out + 1:]))
        b.n_tokens = n
        rc = self._ll.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            return self._decode_failed(rc, [seq for seq, _, _ in work])
        for seq, toks, _ in work:
            seq.slot.tokens.extend(toks)
            if seq.prefilled < len(seq.tokens):
                seq.prefilled = min(seq.prefilled + len(toks), len(seq.tokens))
                if seq.prefilled == len(seq.tokens) - 1:
                    seq.pending = seq.tokens[-1]   # the last prompt token: decoded next step
        events: list[Event] = []
        now = time.monotonic()
        for i, seq, draft in outputs:
            if seq.t_prefill_done is None:
                seq.t_prefill_done = now
            try:
                events.extend(self._take(seq, i, draft))
            except Exception as exc:   # one sequence's failure, not the engine's
                events.append(self.fail(seq.rid, exc))
        return events

    def _take(self, seq: Seq, i: int, draft: list[int]) -> list[Event]:
        """Sample ``seq``'s rows from ``i`` on: the pending token's, then each draft
        token's while the token sampled before it equals it.  What is sampled is what
        decoding one token a step would have sampled (the same chain, grammar and
        logits rows); the draft's rejected rest leaves the KV."""
        toks: list[int] = []
        lps: list[dict | None] = []
        for j in range(len(draft) + 1):
            if seq.grammar is None:
                tok = self._ll.llama_sampler_sample(seq.sampler.sampler, self._ctx.ctx, i + j)
            else:
                tok = seq.grammar.sample(seq.sampler.sampler, self._ctx.ctx, i + j,
                                         self._n_vocab)
            eog = self._ll.llama_vocab_is_eog(self._vocab, tok)
            toks.append(tok)
            lps.append(self._logprobs(i + j, tok, seq.top_logprobs, seq.token_ids)
                       if seq.top_logprobs >= 0 and not eog else None)
            if eog or j == len(draft) or tok != draft[j]:
                break
        if draft:
            assert seq.drafter is not None and seq.slot is not None
            kept = len(toks) - 1
            seq.drafter.verified(len(draft), kept)
            self.cache.truncate(seq.slot, len(seq.slot.tokens) - len(draft) + kept)
        events: list[Event] = []
        for tok, lp in zip(toks, lps):
            if lp is not None:
                seq.lp_held.append(lp)
            events.extend(self._advance(seq, tok))
            if seq.pending is None:        # it ended
                break
            if seq.drafter is not None:
                seq.drafter.push(tok)
        return events

    def fail(self, rid: int, exc: Exception) -> Event:
        """End ``rid`` with ERROR after an exception (``internal`` unless it is a typed
        error, e.g. a grammar that allows no token); its KV is dropped (it may hold half
        a step), every other sequence goes on."""
        seq = self.running.get(rid) or self.parked.get(rid)
        if isinstance(exc, LlmctlError):
            log.warning("request %d ended: %s", rid, exc.message)
            err: LlmctlError = exc
        else:
            log.exception("request %d failed: %s", rid, exc)
            err = InternalError(f"the worker failed on this request: {type(exc).__name__}: {exc}")
        if seq is None:
            return Event(rid, error=err)
        slot = seq.slot
        self._finish(seq, "error", flush=False)
        if slot is not None:
            self.cache.clear(slot)
        return Event(rid, error=err)

    # ---- internals --------------------------------------------------------------------
    def _logprobs(self, i: int, tok: int, top: int, ids: bool) -> dict:
        import numpy as np

        ptr = self._ll.llama_get_logits_ith(self._ctx.ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        return token_logprobs(logits, tok, top, lambda t: self._model.detokenize([t]), ids)

    @staticmethod
    def _with_logprobs(seq: Seq, ev: Event) -> Event:
        """Give ``ev`` (carrying text, or ending ``seq``) the logprobs held so far."""
        if seq.lp_held:
            ev.logprobs, seq.lp_held = seq.lp_held, []
        return ev

    def _advance(self, seq: Seq, tok: int) -> list[Event]:
        """A token was sampled for ``seq``: send it, or end the sequence."""
        seq.pending = None
        if self._ll.llama_vocab_is_eog(self._vocab, tok):
            return [self._finish(seq, "stop")]
        seq.generated += 1
        text = seq.stream.push(self._model.detokenize([tok]))
        if seq.stream.stopped or seq.generated >= seq.max_tokens:
            piece = self._with_logprobs(seq, Event(seq.rid, text)) if text else None
            end = self._finish(seq, "stop" if seq.stream.stopped else "length")
            return [piece, end] if piece else [end]
        seq.pending = tok
        if text:
            seq.window -= 1
            return [self._with_logprobs(seq, Event(seq.rid, text))]
        return []

    def _decode_failed(self, rc: int, seqs: list[Seq]) -> list[Event]:
        """llama_decode refused the batch: its sequences fail, their KV is dropped."""
        log.error("llama_decode returned %d for %d sequence(s): failing them", rc, len(seqs))
        events = []
        for seq in seqs:
            slot = seq.slot
            self._finish(seq, "error", flush=False)
            self.cache.clear(slot)
            events.append(Event(seq.rid, error=InternalError(f"llama_decode returned {rc}")))
        return events

    def _finish(self, seq: Seq, reason: str, flush: bool = True) -> Event:
        self.running.pop(seq.rid, None)
        self.parked.pop(seq.rid, None)
        slot = seq.slot
        if slot is not None:
            seq.slot = None
            self.cache.release(slot)
        tail = seq.stream.finish() if flush else ""
        store = self.cache.store
        spec = seq.drafter
        stats = msgspec.structs.replace(
            done_stats(seq, reason), prefix_hashes=self.cache.prefixes(),
            slot=seq.last_slot, slot_tokens=[len(s.tokens) for s in self.cache.slots],
            drafted=spec.drafted if spec else 0, accepted=spec.accepted if spec else 0,
            kv_store=KvStoreStats(**store.stats()) if store is not None else None,
            threads=ComputeThreads(**self.threads.info()))
        return self._with_logprobs(seq, Event(seq.rid, tail, stats)) if flush \
            else Event(seq.rid, tail, stats)
