"""N-gram speculation: drafts of the tokens a sequence is about to generate, for free.

A ``Drafter`` belongs to one sequence.  It keeps the sequence's tokens (prompt, then
every token generated) and an index from each n-gram (n = ``N_MIN``..``N_MAX``) to where
its latest earlier occurrence continued.  ``draft()`` looks the last n tokens up, longest
n first, and proposes the up to ``k`` tokens that followed them then (an occurrence that
overlaps the end continues periodically): a summary, an extraction, a rewrite or an edit
of a given text repeats long spans of its input, and those spans are drafted without a
model.

Verification (``worker/batch.py``).  A sequence with a draft puts its pending token and
the draft in the step's batch, all with logits; row ``j``'s logits are those decoding one
token a step would compute for the ``j``-th next token if the draft's first ``j`` tokens
are right.  ``_take`` samples the rows in order with the sequence's own chain (and
grammar), keeps each draft token that equals what was sampled before it and stops at the
first that does not: the chain samples the same logits in the same order, with the same
random draws, as without speculation, so a draft changes how many tokens a step yields,
not which.  The rejected rows leave the KV (``seq_rm``).  A draft is never longer than
the sequence's token credit and ``max_tokens`` allow, nor than the batch's free rows.

Kernels (worker/slots.py, "Exactness").  A sequence's 1 + k rows go through the per-row
attention kernel, like the rows of a batch of several sequences, and ggml's Q4_1 products
do not depend on the other rows: up to 256 KV cells a verification writes the KV that
one token a step writes.  The logits then differ at most by the output product's
rounding (one row: ggml's dot products; several: tinyBLAS), which changed no token on
the tests' prompts (greedy and seeded, batched with sequences that do not draft, with
stop strings, a grammar and logprobs: tests/test_speculate.py).  Past 256 cells a
sequence that decodes alone goes through the KV-split attention kernel when it does not
draft and the per-row kernel when it does, so there, as between batched and single-slot
decoding, greedy output can differ where two logits are nearly equal.

Adaptation.  ``k`` grows by two after a draft kept whole and falls to one more than what
was kept otherwise; when the running acceptance rate drops below ``MIN_RATE`` the
sequence stops drafting for ``pause`` generated tokens (doubling each time, up to
``MAX_PAUSE``), so free text that repeats nothing costs no verification rows.
"""
from __future__ import annotations

N_MIN, N_MAX = 2, 4        # the n-gram lengths looked up, longest first
MIN_RATE = 0.25            # below this acceptance rate a sequence pauses drafting
RATE_DECAY = 0.7           # weight of the past in the running acceptance rate
FIRST_PAUSE = 16           # generated tokens without drafting after a low rate ...
MAX_PAUSE = 256            # ... doubling each time, up to this


class Drafter:
    """The n-gram drafts of one sequence (see the module docstring)."""

    def __init__(self, tokens: list[int], max_draft: int) -> None:
        self.max_draft = max_draft
        self.k = max_draft                  # the size of the next draft
        self.rate = 1.0                     # running acceptance rate
        self.pause = FIRST_PAUSE            # the next pause's length
        self.paused = 0                     # generated tokens left before drafting again
        self.drafted = 0                    # draft tokens verified, in all
        self.accepted = 0                   # draft tokens kept, in all
        self._tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}   # n-gram -> where it last continued
        for t in tokens:
            self.push(t)

    def push(self, tok: int) -> None:
        """The sequence took ``tok`` (a prompt token, or a generated one)."""
        toks = self._tokens
        end = len(toks)                     # ``tok``'s index: the continuation of the
        for n in range(N_MIN, N_MAX + 1):   # n-grams that end just before it
            if end >= n:
                self._next[tuple(toks[end - n:end])] = end
        toks.append(tok)
        if self.paused:
            self.paused -= 1

    def draft(self, limit: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens likely to follow the tokens so far ([] if none)."""
        k = min(self.k, limit)
        if k <= 0 or self.paused:
            return []
        toks = self._tokens
        for n in range(min(N_MAX, len(toks)), N_MIN - 1, -1):
            at = self._next.get(tuple(toks[len(toks) - n:]))
            if at is not None:       # past the end, the repeat goes on: period len - at
                period = len(toks) - at
                return [toks[at + i % period] for i in range(k)]
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens was verified; its first ``accepted`` were kept."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.k = min(self.max_draft, self.k + 2) if accepted == drafted \
            else max(1, accepted + 1)
        self.rate = RATE_DECAY * self.rate + (1 - RATE_DECAY) * accepted / drafted
        if self.rate < MIN_RATE:
            self.paused, self.pause = self.pause, min(MAX_PAUSE, 2 * self.pause)
            self.rate, self.k = 1.0, self.max_draft
