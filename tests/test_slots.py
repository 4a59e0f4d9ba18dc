"""The KV slots' host-memory store and prefix arithmetic (worker/slots.py), without llama.cpp."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.worker.slots import KVStore, common_prefix

tokens = st.lists(st.integers(0, 3), max_size=40)


def naive_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=500)
@given(tokens, tokens, st.one_of(st.none(), st.integers(-2, 50)))
def test_common_prefix_matches_the_obvious_loop(a, b, limit):
    want = naive_prefix(a, b)
    if limit is not None:
        want = min(want, max(limit, 0))
    assert common_prefix(a, b, limit) == want
    assert common_prefix(tuple(a), b, limit) == want      # tuples and lists mix


def test_best_is_the_longest_prefix_within_the_limit():
    s = KVStore(1000)
    s.put([1, 2, 3, 4, 5], b"x" * 10)
    s.put([1, 2, 9], b"y" * 10)
    e, n = s.best([1, 2, 3, 4, 7], limit=10)
    assert (e.tokens, n) == ((1, 2, 3, 4, 5), 4)
    e, n = s.best([1, 2, 3, 4, 7], limit=2)
    assert n == 2
    assert s.best([8], limit=10) == (None, 0)


def test_an_entry_covered_by_another_is_not_kept():
    s = KVStore(1000)
    assert s.put([1, 2, 3], b"a" * 10)
    assert not s.put([1, 2], b"b" * 10)          # already held by [1, 2, 3]
    assert s.put([1, 2, 3, 4], b"c" * 10)        # makes [1, 2, 3] redundant
    assert [e.tokens for e in s.entries()] == [(1, 2, 3, 4)]
    assert s.bytes == 10


def test_eviction_is_least_recently_used_and_bounded_in_bytes():
    s = KVStore(25)
    for i in range(5):
        assert s.put([i, 100], bytes(10), hashes=(i,))
        assert s.bytes <= 25
    assert [e.tokens[0] for e in s.entries()] == [4, 3]      # newest first
    assert s.evictions == 3
    assert not s.put([9], bytes(26))                          # larger than the store
    assert len(s) == 2


def test_take_moves_an_entry_out_and_counts_the_hit():
    s = KVStore(100)
    s.put([1, 2, 3], bytes(10))
    s.put([4, 5], bytes(10))
    e, n = s.best([1, 2, 3, 7], limit=10)
    s.take(e, n)
    assert [x.tokens for x in s.entries()] == [(4, 5)]
    assert s.bytes == 10
    assert s.stats()["hits"] == 1 and s.stats()["hit_tokens"] == 3
