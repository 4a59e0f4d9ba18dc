"""A draft model: a second, smaller model of the target's vocabulary drafts the tokens
each sequence is about to generate.

``[[models]]`` entry ``speculative = "draft"`` with ``draft = "<another entry>"``: the
target's worker loads that entry's GGUF beside its own model (``DraftModel``), with its
own ``llama_context`` of the target's shape (``n_seq_max`` = the slots, ``n_ctx`` cells
per slot, one KV stream each), so sequence id ``i`` is slot ``i`` in both.  A draft is
verified exactly as an n-gram draft is (``worker/batch.py``, ``_take``): the target's
sampler chain keeps the prefix it would have sampled anyway, so a draft model changes
how many tokens a step yields, never which.

Each sequence's ``ModelDrafter`` keeps its tokens (prompt, then every token taken; the
last is the target's pending token).  ``DraftModel.draft`` drafts for all drafting
sequences of a step at once: a slot's draft KV holds a prefix of its sequence's tokens
(what it held and the sequence still has: the rejected rest of the last draft leaves
with ``seq_rm``), the first ``llama_decode`` feeds every sequence what its KV lacks (its
prompt on first use, then the tokens taken since its last draft) and yields each one's
first draft token, greedy; each further ``llama_decode`` has one row per sequence that
wants more.  So a draft of ``k`` tokens for ``n`` sequences is ``k`` decodes, not
``k x n``.  The catch-up is at most ``rows`` tokens a step (all sequences together): a
sequence whose catch-up does not fit goes on with it next step and drafts nothing now,
so a long prompt never stalls the running streams for more than one chunk.

Cost.  A draft token costs its row in the target's batch (``speculate.row_cost``) and
one token of the draft model's decoding: ``cost``, the ratio of the two models'
parameter counts (decoding time follows the weights read per token).  The
``speculate.Adaptive`` rule then drafts the ``j`` tokens whose ``p ** j`` exceeds both
together.  A draft as large as the target (``cost`` 1) never pays: it only probes.
"""
from __future__ import annotations

import logging
from typing import Any

from llmctl.worker.engine import ModelLoadError, ModelRefused, load_model
from llmctl.worker.slots import common_prefix
from llmctl.worker.speculate import Adaptive

log = logging.getLogger(__name__)

VOCAB_SAMPLE = 512     # token texts compared between the draft and the target


class ModelDrafter(Adaptive):
    """One sequence's drafts by the draft model: its tokens and the adaptation."""

    def __init__(self, tokens: list[int], max_draft: int, cost: float) -> None:
        super().__init__(max_draft, cost)
        self.tokens = list(tokens)

    def push(self, tok: int) -> None:
        self.tokens.append(tok)
        super().push(tok)


def check_vocab(ll: Any, name: str, target: Any, draft: Any) -> None:
    """ModelRefused unless ``draft`` tokenizes as ``target`` does: the same tokenizer
    model, number of tokens, and texts of a sample of tokens (special ones included)."""
    def fail(what: str) -> None:
        raise ModelRefused(f"draft = {name!r}: {what}: a draft model must have the "
                             "target's vocabulary (the same tokenizer)")

    kind = [m.metadata().get("tokenizer.ggml.model", "") for m in (target, draft)]
    if kind[0] != kind[1]:
        fail(f"its tokenizer is {kind[1]!r}, the target's {kind[0]!r}")
    n = [ll.llama_vocab_n_tokens(m.vocab) for m in (target, draft)]
    if n[0] != n[1]:
        fail(f"its vocabulary has {n[1]} tokens, the target's {n[0]}")
    sample = {*range(0, n[0], max(1, n[0] // VOCAB_SAMPLE)), target.token_bos(),
              target.token_eos(), n[0] - 1} - {-1}
    differ = [t for t in sorted(sample) if target.token_get_text(t) != draft.token_get_text(t)]
    if differ:
        fail(f"token {differ[0]} is {draft.token_get_text(differ[0])!r} there, "
             f"{target.token_get_text(differ[0])!r} in the target")


class DraftModel:
    """The draft model of a batching engine and its KV, one sequence per slot."""

    def __init__(self, ll: Any, name: str, path: str, n_gpu_layers: int, target: Any,
                 n_ctx: int, slots: int, rows: int, threads: int, kv_params: Any) -> None:
        from llama_cpp import _internals

        from llmctl.worker import threadpool
        self._ll = ll
        self._model = load_model(ll, path, n_gpu_layers,
                                 f"draft = {name!r}: cannot load {path}")
        check_vocab(ll, name, target, self._model)
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * slots
        cp.n_batch = cp.n_ubatch = rows
        cp.n_seq_max = slots
        cp.n_threads = cp.n_threads_batch = threads
        kv_params(cp)
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=False)
        except ValueError as exc:
            raise ModelLoadError(f"draft = {name!r}: cannot create a context of {slots} x "
                                 f"{n_ctx}: {exc}") from exc
        self._pool = threadpool.attach(self._ctx.ctx, threads)
        self._mem = ll.llama_get_memory(self._ctx.ctx)
        self._batch = _internals.LlamaBatch(n_tokens=rows, embd=0, n_seq_max=1)
        self._vocab = self._model.vocab
        self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self.rows = rows
        self.cost = self._model.n_params() / max(1, target.n_params())
        self.held: list[list[int]] = [[] for _ in range(slots)]   # each slot's draft KV
        log.info("draft model %s: %.0fM parameters, %.2f of the target's", path,
                 self._model.n_params() / 1e6, self.cost)

    def drafter(self, tokens: list[int], max_draft: int) -> ModelDrafter:
        return ModelDrafter(tokens, max_draft, self.cost)

    def set_threads(self, n: int) -> None:
        self._ll.llama_set_n_threads(self._ctx.ctx, n, n)

    def draft(self, asks: list[tuple[int, ModelDrafter, int]]) -> list[list[int]]:
        """The greedy drafts of ``(slot id, drafter, k)``, in increasing slot ids: up to
        ``k`` tokens each (fewer past an end-of-generation token, none for a sequence
        whose catch-up did not fit in this step)."""
        out: list[list[int]] = [[] for _ in asks]
        feeds = []                            # (ask, slot id, tokens to feed, logits)
        room = self.rows
        for i, (sid, d, _) in enumerate(asks):
            held = self.held[sid]
            n = min(common_prefix(held, d.tokens, len(d.tokens)), len(d.tokens) - 1)
            if n < len(held):                 # a rejected draft, or another sequence's
                self._drop(sid, n)
                n = len(held)                 # (0 if llama.cpp could only drop it all)
            toks = d.tokens[n:][:room]
            room -= len(toks)
            if toks:
                feeds.append((i, sid, toks, len(toks) == len(d.tokens) - n))
        if not self._decode([(sid, toks, last) for _, sid, toks, last in feeds], out,
                            [i for i, _, _, last in feeds if last]):
            return [[] for _ in asks]
        want = [i for i, _, _, last in feeds if last]
        for _ in range(1, max((k for _, _, k in asks), default=0)):
            want = [i for i in want if len(out[i]) < asks[i][2]
                    and not self._ll.llama_vocab_is_eog(self._vocab, out[i][-1])]
            if not want or not self._decode([(asks[i][0], [out[i][-1]], True) for i in want],
                                            out, want):
                break
        return [o[:k] for o, (_, _, k) in zip(out, asks)]

    def _decode(self, rows: list[tuple[int, list[int], bool]], out: list[list[int]],
                who: list[int]) -> bool:
        """One llama_decode of ``(slot id, tokens, logits of the last)``; the argmax of
        each row with logits goes to ``out[who[...]]`` in order.  False if it failed (the
        KV of those slots is dropped)."""
        import numpy as np

        ll, b = self._ll, self._batch.batch
        n, at = 0, []
        for sid, toks, last in rows:
            pos = len(self.held[sid])
            for i, tok in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos + i, 1
                b.seq_id[n][0] = sid
                b.logits[n] = last and i == len(toks) - 1
                n += 1
            if last:
                at.append(n - 1)
        if not n:
            return True
        b.n_tokens = n
        rc = ll.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            log.warning("the draft model's llama_decode returned %d: no drafts this step", rc)
            for sid, _, _ in rows:
                self._drop(sid, 0)
            return False
        for sid, toks, _ in rows:
            self.held[sid].extend(toks)
        for i, row in zip(who, at):
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx.ctx, row),
                                           shape=(self._n_vocab,))
            out[i].append(int(logits.argmax()))
        return True

    def _drop(self, sid: int, n: int) -> None:
        """Keep the first ``n`` tokens of slot ``sid``'s draft KV."""
        held = self.held[sid]
        if not self._ll.llama_memory_seq_rm(self._mem, sid, n, -1):
            self._ll.llama_memory_seq_rm(self._mem, sid, -1, -1)
            n = 0
        del held[n:]
