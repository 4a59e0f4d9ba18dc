"""What a request's end carries: a worker's DONE statistics (``DoneStats``, with the
worker's caches and compute threads), the end as the fronts render it (``Finished``), and
the logprob entries of LOGPROBS.  The gateway <-> worker messages (``messages.py``) carry
them; the fronts read them.
"""
from __future__ import annotations

import msgspec


class ComputeThreads(msgspec.Struct, frozen=True):
    """A worker's compute threads now, its maximum, its policy (worker/compute_threads.py)."""
    n: int
    max: int
    policy: str = "fixed"
    changes: int = 0


class KvStoreStats(msgspec.Struct, frozen=True):
    entries: int = 0
    bytes: int = 0
    limit: int = 0
    hits: int = 0
    hit_tokens: int = 0
    saves: int = 0
    evictions: int = 0


class DoneStats(msgspec.Struct, frozen=True, omit_defaults=True):
    """DONE's statistics; ``prefix_hashes``, ``kv_store`` and ``threads`` describe the
    worker (its caches, its compute threads)."""
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    phase: str = "decode"
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    prefix_hashes: list[int] | None = None
    kv_store: KvStoreStats | None = None
    threads: ComputeThreads | None = None     # the worker's compute threads, as it ends
    embeddings: list[str] | None = None   # base64 float32 LE vectors of an ``embed`` request
    tokens: list[int] | None = None       # a ``tokenize`` request's tokens
    text: str | None = None               # what was tokenized, or a ``detokenize``'s text
    pieces: list[str | list[int]] | None = None   # each token's text (bytes if not UTF-8)
    slot: int = -1                        # the slot it ran in
    slot_tokens: list[int] | None = None  # the tokens each slot's KV holds now
    stop_word: str | None = None          # the stop string that ended it
    drafted: int = 0                      # speculation: draft tokens verified
    accepted: int = 0                     # speculation: draft tokens kept (generated)


class Finished(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A request's end as the fronts render it: the worker's DONE statistics (absent for a
    request that never reached a worker) and the gateway's timing."""
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    phase: str | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    embeddings: list[str] | None = None
    tokens: list[int] | None = None
    text: str | None = None
    pieces: list[str | list[int]] | None = None
    slot: int = -1
    stop_word: str | None = None
    drafted: int | None = None      # speculation: draft tokens verified (if it drafted)
    accepted: int | None = None     # speculation: draft tokens kept
    worker: str
    ttft_ms: float
    total_ms: float


class TopLogprob(msgspec.Struct, frozen=True, omit_defaults=True):
    token: str
    logprob: float
    bytes: list[int]
    id: int | None = None              # the token id, for a request with ``token_ids``


class TokenLogprob(msgspec.Struct, frozen=True, omit_defaults=True):
    """One generated token's logprob entry (OpenAI's chat shape)."""
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]
    id: int | None = None


class LogprobsBody(msgspec.Struct, frozen=True):
    content: list[TokenLogprob]
