"""A host-memory store of KV states: the prompt cache's second level.

A worker has ``slots`` KV streams; a slot keeps the KV of its last sequence until a
new sequence needs the slot.  Without a second level, a workload that cycles through
more distinct prompts than there are slots misses every time (LRU thrashes).  Before
a slot's KV is overwritten, its state (``llama_state_seq_get_data``: the cells of one
sequence, about 23 KB a token for SmolLM2-135M) is saved here, keyed by its tokens; a
new request whose longest cached prefix is here gets that state written back into its
slot (``llama_state_seq_set_data``) instead of evaluating those tokens again.  The
bytes are the KV exactly as computed, so a hit gives the same output as a miss.

llama-server does the same (``--cache-ram``).  The store is bounded in bytes and
evicts the least recently used entry; an entry whose tokens are a prefix of another
entry's is redundant and dropped.  Pure bookkeeping: the llama calls are the
engine's.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class Entry:
    tokens: tuple[int, ...]       # what the state's KV holds, positions 0..n-1
    data: bytes                   # llama_state_seq_get_data of that sequence
    hashes: tuple[int, ...] = ()  # prefix hashes of the request that computed it (routing)


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int],
                  limit: int | None = None) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (at most ``limit``).

    Binary search on slice equality: O(n log n) element compares in C rather than a
    Python loop over n tokens."""
    hi = min(len(a), len(b))
    if limit is not None:
        hi = min(hi, max(limit, 0))
    if hi == 0 or a[0] != b[0]:
        return 0
    if tuple(a[:hi]) == tuple(b[:hi]):
        return hi
    lo = 1                            # a[:lo] == b[:lo] holds; a[:hi] == b[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(a[lo:mid]) == tuple(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


class KVStore:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()   # oldest first
        self._next = 0
        self.bytes = 0
        self.hits = 0          # restores
        self.hit_tokens = 0    # tokens not evaluated thanks to a restore
        self.saves = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """Most recently used first."""
        return list(reversed(self._entries.values()))

    def best(self, tokens: list[int], limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``tokens`` (capped at ``limit``)."""
        best, n_best = None, 0
        for e in self._entries.values():
            n = common_prefix(e.tokens, tokens, limit)
            if n > n_best:
                best, n_best = e, n
        return best, n_best

    def covers(self, tokens: list[int] | tuple[int, ...]) -> bool:
        """Does some entry hold all of ``tokens`` already (as a prefix of its own)?"""
        n = len(tokens)
        return any(len(e.tokens) >= n and common_prefix(e.tokens, tokens) == n
                   for e in self._entries.values())

    def put(self, tokens: list[int] | tuple[int, ...], data: bytes,
            hashes: tuple[int, ...] = ()) -> bool:
        """Keep ``data`` for ``tokens``; False when it cannot fit or adds nothing."""
        if not tokens or len(data) > self.limit or self.covers(tokens):
            return False
        tokens = tuple(tokens)
        for key, e in list(self._entries.items()):       # made redundant by the new one
            if len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens):
                self._drop(key)
        while self._entries and self.bytes + len(data) > self.limit:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[self._next] = Entry(tokens, data, tuple(hashes))
        self._next += 1
        self.bytes += len(data)
        self.saves += 1
        return True

    def take(self, entry: Entry, used: int) -> None:
        """``entry`` went back into a slot, ``used`` of its tokens reused: it leaves the
        store (the slot holds it now, and saves it again when it is overwritten)."""
        for key, e in self._entries.items():
            if e is entry:
                self._drop(key)
                break
        self.hits += 1
        self.hit_tokens += used

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        self.bytes -= len(e.data)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "limit": self.limit,
                "hits": self.hits, "hit_tokens": self.hit_tokens, "saves": self.saves,
                "evictions": self.evictions}
