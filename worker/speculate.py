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

Adaptation.  A draft pays when what its tokens are likely to bring exceeds what their
rows cost.  The drafter estimates ``p``, the chance that its next draft token is kept
(kept tokens and first rejections, the older ones weighing less); the ``j``-th draft
token is kept with chance ``p ** j`` and costs ``row_cost(n)`` of a token's time with
``n`` sequences decoding, so a draft has the ``j`` tokens with ``p ** j`` above that.
On this 2-core CPU a step of ``n`` rows takes about ``STEP_MS + ROW_MS x n``: one
sequence's extra row costs half a token, at 8 sequences nine tenths, so speculation
drafts long for a text it copies, short for one it paraphrases, and under load only
for near-verbatim copies.  When no draft pays the sequence stops drafting for ``pause``
generated tokens (doubling each time, up to ``MAX_PAUSE``), then probes with a
``PROBE``-token draft: free text that repeats nothing costs almost no rows.  ``Adaptive``
is this rule, whatever drafts: a draft model's drafts (``worker/draft_model.py``) follow
it with the draft model's own time per token added to a draft token's cost.
"""
from __future__ import annotations

import math

N_MIN, N_MAX = 2, 4        # the n-gram lengths looked up, longest first
STEP_MS, ROW_MS = 4.1, 4.9 # a decode step's time, fixed and per row (2-core CPU, SmolLM2)
DECAY = 0.85               # the weight of past verifications in ``p``, per verification
PROBE = 2                  # a probe's draft length (the first draft, or after a pause)
FIRST_PAUSE = 16           # generated tokens without drafting after no draft paid ...
MAX_PAUSE = 256            # ... doubling each time, up to this


def row_cost(n: int) -> float:
    """One more row's time over a token's, with ``n`` sequences decoding one row each."""
    return ROW_MS * n / (STEP_MS + ROW_MS * n)


def draft_length(p: float, cost: float, most: int) -> int:
    """The draft tokens worth verifying: those whose chance ``p ** j`` exceeds ``cost``."""
    if p <= cost:
        return 0
    if p >= 1.0:
        return most
    return min(most, int(math.log(cost) / math.log(p)))


class Adaptive:
    """The adaptation of one sequence's drafts (see the module docstring), whatever
    drafts them: ``extra_cost`` is what a draft token costs besides its row in the
    target's batch, as a fraction of a target token's time (0 for n-gram lookup; a
    draft model's own decoding for ``worker/draft_model.py``)."""

    def __init__(self, max_draft: int, extra_cost: float = 0.0) -> None:
        self.max_draft = max_draft
        self.extra_cost = extra_cost
        self.kept = 0.0                     # draft tokens kept, decayed
        self.missed = 0.0                   # drafts cut short by a rejection, decayed
        self.probe = True                   # the next draft is a probe
        self.pause = FIRST_PAUSE            # the next pause's length
        self.paused = 0                     # generated tokens left before drafting again
        self.drafted = 0                    # draft tokens verified, in all
        self.accepted = 0                   # draft tokens kept, in all

    @property
    def p(self) -> float:
        """The estimated chance that the next draft token is kept."""
        return (self.kept + 1.0) / (self.kept + self.missed + 2.0)

    def push(self, tok: int) -> None:
        """The sequence took ``tok`` (a prompt token, or a generated one)."""
        if self.paused:
            self.paused -= 1
            self.probe = not self.paused

    def length(self, limit: int, decoding: int = 1) -> int:
        """How many draft tokens are worth verifying with ``decoding`` sequences in the
        step, at most ``limit`` (0: none; a pause may start)."""
        if self.paused or limit <= 0:
            return 0
        if self.probe:
            k = PROBE
        else:
            k = draft_length(self.p, row_cost(decoding) + self.extra_cost, self.max_draft)
            if not k:
                self.paused, self.pause = self.pause, min(MAX_PAUSE, 2 * self.pause)
                return 0
        return min(k, limit)

    def verified(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens was verified; its first ``accepted`` were kept."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.probe = False
        self.kept = DECAY * self.kept + accepted
        self.missed = DECAY * self.missed + (accepted < drafted)


class Drafter(Adaptive):
    """The n-gram drafts of one sequence (see the module docstring)."""

    def __init__(self, tokens: list[int], max_draft: int) -> None:
        super().__init__(max_draft)
        self._tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}   # n-gram -> where it last continued
        for t in tokens:
            self.push(t)

    def push(self, tok: int) -> None:
        toks = self._tokens
        end = len(toks)                     # ``tok``'s index: the continuation of the
        for n in range(N_MIN, N_MAX + 1):   # n-grams that end just before it
            if end >= n:
                self._next[tuple(toks[end - n:end])] = end
        toks.append(tok)
        super().push(tok)

    def draft(self, limit: int, decoding: int = 1) -> list[int]:
        """The tokens likely to follow the tokens so far that are worth verifying with
        ``decoding`` sequences in the step, at most ``limit`` ([] if none)."""
        return self.lookup(self.length(limit, decoding))

    def lookup(self, k: int) -> list[int]:
        """The up to ``k`` tokens that followed the longest n-gram ending the tokens."""
        toks = self._tokens
        for n in range(min(N_MAX, len(toks)), N_MIN - 1, -1) if k > 0 else ():
            at = self._next.get(tuple(toks[len(toks) - n:]))
            if at is not None:       # past the end, the repeat goes on: period len - at
                period = len(toks) - at
                return [toks[at + i % period] for i in range(k)]
        return []
