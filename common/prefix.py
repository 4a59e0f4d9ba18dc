"""Text-level prefix hashes for cache-aware routing (pure, shared by gateway and worker).

A request's prompt (or its chat messages) is written as one canonical string and cut
at fixed boundaries; the hash of each prefix ending at a boundary is chained from the
previous one.  Two requests share the first ``k`` hashes exactly when their canonical
texts agree up to the k-th boundary, so "the number of leading hashes a worker holds"
measures how much of a request's prompt that worker's prompt cache already has.

Boundaries are every 64 characters up to 1 KiB, then 1/8 further each time, so a long
chat history costs about 60 hashes and the resolution stays within 12.5% of the length.
The worker reports the hashes of the prompts whose KV it keeps; the gateway matches
them against those of a new request.  A heuristic: tokenization is not involved, and
a match only steers routing, never what the worker computes.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

MIN_BLOCK = 64
MAX_HASHES = 64


def canonical(prompt: str | None, messages: Iterable[tuple[str, str]] | None) -> str:
    """One string per request; a prompt and a conversation never collide."""
    if messages:
        return "M" + "".join(f"{role}\x1f{content}\x1e" for role, content in messages)
    return "P" + (prompt or "")


def boundaries(length: int):
    b = 0
    while True:
        b += max(MIN_BLOCK, b // 8)
        if b > length:
            return
        yield b


def prefix_hashes(prompt: str | None, messages: Iterable[tuple[str, str]] | None = None,
                  limit: int = MAX_HASHES) -> tuple[int, ...]:
    """Chained 48-bit hashes of the canonical text's prefixes (JSON-safe integers)."""
    text = canonical(prompt, messages).encode("utf-8", "surrogatepass")
    out: list[int] = []
    h = hashlib.blake2b(digest_size=6)
    start = 0
    for end in boundaries(len(text)):
        h.update(text[start:end])
        out.append(int.from_bytes(h.copy().digest(), "big"))
        start = end
        if len(out) >= limit:
            break
    return tuple(out)


def request_hashes(req: Any) -> tuple[int, ...]:
    """The same hashes from a request as the gateway and the worker both hold it (a GenRequest)."""
    pairs = [(m.role, m.content) for m in req.messages] if req.messages else None
    return prefix_hashes(req.prompt, pairs)


def matched(hashes: tuple[int, ...], held: set[int] | frozenset[int]) -> int:
    """How many leading hashes of a request a worker holds."""
    n = 0
    for h in hashes:
        if h not in held:
            break
        n += 1
    return n
