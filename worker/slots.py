"""The KV slots of a batching engine: where a sequence runs, and what each slot's KV holds.

One ``llama_context`` holds ``n`` sequences; sequence id ``i`` is slot ``i``.  The
engine (``worker/batch.py``) asks ``SlotCache.place`` for a slot when a sequence
starts or resumes, hands the slot back with ``release`` (the sequence ended) or
``park`` (it waits for token credit), and ``clear``s it when its KV is in doubt.  A
slot's ``tokens`` say what its KV holds, positions 0..n-1; the engine appends what
it decodes.

Prompt cache, two levels.  A slot whose sequence ended keeps its KV (prompt and
generated tokens); it stays a free slot.  Before a slot's KV is cut to make room for
a new sequence, its state is saved to a host-memory store (``KVStore``, ``[workers]
prompt_cache_mib``, like llama-server's ``--cache-ram``): the cells of one sequence,
about 23 KB a token for SmolLM2-135M, keyed by its tokens, bounded in bytes, least
recently used evicted first, and an entry whose tokens are a prefix of another's
dropped as redundant.  The bytes are the KV exactly as computed, so a hit gives the
same output as a miss.  A new sequence takes the free slot holding its
longest common prefix, or the least recently used one; if another slot (free or
running) or the store holds a longer prefix, that KV is written into the slot
(``llama_state_seq_get/set_data``: only the cells used, where ``seq_cp`` between
streams copies a whole stream buffer).  Everything past the common prefix is
dropped (``seq_rm``) before the new sequence is written.  With ``prompt_cache =
False`` a slot's KV is dropped as soon as its sequence ends and nothing is stored.

Exactness.  On the CPU ggml picks kernels by shape, and they round differently.
Flash attention: a chunk of 64 or more query rows goes through a tiled kernel, a
single query row over 512 or more KV cells (more than 256 in use) through a KV-split
kernel, anything else through a per-row kernel whose result for a row does not
depend on the other rows.  The Q8_0 output matrix: one column uses ggml's dot
products, two or more llamafile's tinyBLAS.  Measured on SmolLM2 (150 and 400-token
prompts): any chunking into pieces of 2..63 tokens leaves the same KV bytes; pieces
of 64+, or a last piece of one token past 256 cells, move the last logits by up to
0.8.  So prompt chunks are 2..``n_batch`` tokens with ``n_batch`` below 64 by
default, no 1-token chunk is left, and the last prompt token is not prefilled: it is
decoded in the next step with the decoding sequences, like a generated token (a
full cache hit costs one token of a step, not a ``llama_decode`` of its own).  Then
a prompt's KV, but for its last token, does not depend on chunking, concurrency or
cache hits (tests compare the bytes).  What remains: a token decoded in a batch
with other sequences goes through the per-row kernel and a shared tinyBLAS output
product, where the same token decoded alone past 256 cells goes through the
KV-split kernel; batched and single-slot greedy output can then differ where two
logits are nearly equal.
"""
from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from llmctl.common.errors import InternalError
from llmctl.worker.engine import reusable_prefix

log = logging.getLogger(__name__)

COPY_MIN = 4           # a gain of fewer tokens is evaluated again rather than copied in
MAX_REPORTED = 512     # prefix hashes reported to the gateway in a DONE


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


@dataclass(eq=False)
class Slot:
    id: int                                # the llama sequence id
    tokens: list[int] = field(default_factory=list)    # what its KV holds, positions 0..n-1
    seq: Any = None                        # the engine's sequence running in it
    hashes: tuple[int, ...] = ()           # prefix hashes of the prompt its KV holds
    used: int = 0                          # LRU tick


class SlotCache:
    """The ``n`` slots of a ``LlamaContext`` and the host store behind them."""

    def __init__(self, ll: Any, ctx: Any, n: int, unified: bool, prompt_cache: bool,
                 store_bytes: int) -> None:
        self._ll, self._ctx, self._mem = ll, ctx.ctx, ctx.memory
        self.unified = unified
        self.prompt_cache = prompt_cache
        self.store = KVStore(store_bytes) if prompt_cache and store_bytes else None
        self.slots = [Slot(i) for i in range(n)]
        self._tick = 0

    def place(self, seq: Any, tokens: list[int], hashes: tuple[int, ...], reuse: bool = True,
              want: int = -1) -> tuple[Slot, int]:
        """Give ``seq`` (whose prompt is ``tokens``) a free slot holding as much of
        ``tokens`` as the caches allow (nothing without ``reuse``); slot ``want`` when it
        is free.  Returns the slot and how many tokens (at most all but the last) its KV
        holds."""
        # The last prompt token is always decoded like a generated one (see the module
        # docstring); the rest is reused or prefilled, never leaving a 1-token chunk.
        last = len(tokens) - 1
        match = {s.id: reusable_prefix(common_prefix(s.tokens, tokens, last), last)
                 if self.prompt_cache and reuse else 0 for s in self.slots}
        free = [s for s in self.slots if s.seq is None]
        target = max(free, key=lambda s: (s.id == want, match[s.id], -s.used, -s.id))
        source = max(self.slots, key=lambda s: match[s.id])
        n = match[target.id]
        if self.store is not None and n < len(target.tokens):
            self._save(target)                 # its KV is about to be cut
        entry, n_stored = self.store.best(tokens, last) if self.store and reuse \
            else (None, 0)
        n_stored = reusable_prefix(n_stored, last)
        if entry is not None and n_stored >= max(n, match[source.id]) + COPY_MIN:
            n = self._restore(entry, target, n_stored)
        elif match[source.id] >= n + COPY_MIN:
            n = self._copy(source, target, match[source.id])
        else:
            n = self._truncate(target, n)
        self._tick += 1
        target.seq, target.hashes, target.used = seq, hashes, self._tick
        return target, n

    def park(self, slot: Slot) -> None:
        """Its sequence waits without the slot: the slot is free, its KV kept (a cache
        entry like any other, saved to the store when the slot is reused)."""
        slot.seq = None
        self._tick += 1
        slot.used = self._tick

    def release(self, slot: Slot) -> None:
        """Its sequence ended: the slot is free; its KV stays as a cache entry, or is
        dropped without the prompt cache."""
        self.park(slot)
        if not self.prompt_cache:
            self.clear(slot)

    def clear(self, slot: Slot) -> None:
        self._ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.tokens, slot.hashes = [], ()

    def truncate(self, slot: Slot, n: int) -> None:
        """Drop ``slot``'s KV past its first ``n`` tokens (a draft's rejected rest)."""
        if self._truncate(slot, n) != n:
            raise InternalError("llama.cpp could not drop a rejected draft from the KV")

    def prefixes(self) -> list[int]:
        """Prefix hashes of the prompts whose KV the slots or the store hold (for routing)."""
        seen: dict[int, None] = {}
        for slot in sorted(self.slots, key=lambda s: -s.used):
            if slot.tokens:
                seen.update(dict.fromkeys(slot.hashes))
        for entry in self.store.entries() if self.store else ():
            if len(seen) >= MAX_REPORTED:
                break
            seen.update(dict.fromkeys(entry.hashes))
        return list(seen)[:MAX_REPORTED]

    def positions(self) -> list[int]:
        """llama.cpp's largest KV position of every slot (-1: empty)."""
        return [self._ll.llama_memory_seq_pos_max(self._mem, s.id) for s in self.slots]

    def state_get(self, seq_id: int) -> Any:
        """The KV state of one sequence as a ctypes byte array (None on failure)."""
        ll, ctx = self._ll, self._ctx
        size = ll.llama_state_seq_get_size(ctx, seq_id)
        buf = (ctypes.c_uint8 * size).from_buffer(bytearray(size))   # calloc: fast
        if not size or ll.llama_state_seq_get_data(ctx, buf, size, seq_id) != size:
            log.warning("could not read the KV state of sequence %d", seq_id)
            return None
        return buf

    # ---- moving KV between slots and the store ------------------------------------------
    def _copy(self, src: Slot, dst: Slot, n: int) -> int:
        """Give ``dst`` the first ``n`` tokens of ``src``'s KV."""
        ll, mem = self._ll, self._mem
        if self.unified:      # cells are shared: a metadata copy
            ll.llama_memory_seq_rm(mem, dst.id, -1, -1)
            ll.llama_memory_seq_cp(mem, src.id, dst.id, 0, n)
            dst.tokens = src.tokens[:n]
            return n
        # Streams: seq_cp would copy the whole stream buffer; the state of the
        # sequence is only its used cells.
        data = self.state_get(src.id)
        if data is None or not self._state_set(dst, data):
            return self._truncate(dst, 0)
        dst.tokens = list(src.tokens)
        return self._truncate(dst, n)

    def _save(self, slot: Slot) -> None:
        """Keep ``slot``'s KV in the host-memory store before it is cut."""
        assert self.store is not None
        if len(slot.tokens) < COPY_MIN or self.store.covers(slot.tokens):
            return
        data = self.state_get(slot.id)
        if data is not None:
            self.store.put(slot.tokens, data, slot.hashes)

    def _restore(self, entry: Any, dst: Slot, n: int) -> int:
        """Write a stored state into ``dst`` and keep its first ``n`` tokens."""
        assert self.store is not None
        if not self._state_set(dst, entry.data):
            return self._truncate(dst, 0)
        self.store.take(entry, n)
        dst.tokens = list(entry.tokens)
        return self._truncate(dst, n)

    def _state_set(self, dst: Slot, data: Any) -> bool:
        """Replace ``dst``'s KV by a saved state; on failure ``dst`` is left empty."""
        n = self._ll.llama_state_seq_set_data(self._ctx, data, len(data), dst.id)
        if n != len(data):
            log.warning("could not restore a KV state into slot %d", dst.id)
            self.clear(dst)
            return False
        return True

    def _truncate(self, slot: Slot, n: int) -> int:
        """Keep the first ``n`` tokens of ``slot``'s KV."""
        if n < len(slot.tokens) and not self._ll.llama_memory_seq_rm(self._mem, slot.id, n, -1):
            self._ll.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
            n = 0
        del slot.tokens[n:]
        return n
