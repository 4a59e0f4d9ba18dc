"""Internal gateway <-> worker messages (common/messages.py): round trips, garbage."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.common import messages as m

rids = st.integers(0, 2**64 - 1)


@given(st.sampled_from(list(m.Kind)), st.one_of(st.none(), rids), st.binary(max_size=64))
def test_message_round_trip(kind, rid, body):
    assert m.decode(m.encode(kind, rid, body)) == m.Message(kind, rid, body)


@given(st.lists(st.tuples(rids, st.text(max_size=20)), max_size=20))
def test_batch_of_tokens_round_trip(toks):
    got = m.from_worker(m.encode_batch([(m.Kind.TOKEN, r, t.encode()) for r, t in toks]))
    assert got == m.Batch([m.Token(r, t) for r, t in toks])


def test_batch_records_are_typed_or_invalid():
    done = m.body(m.DoneStats(finish_reason="stop", completion_tokens=3))
    got = m.from_worker(m.encode_batch([(m.Kind.TOKEN, 1, b"hi"), (m.Kind.DONE, 1, done),
                                        (m.Kind.DONE, 2, b"{}"), (m.Kind.TOKEN, 3, b"\xff")]))
    assert isinstance(got, m.Batch)
    t, d, bad_done, bad_token = got.items
    assert t == m.Token(1, "hi") and d == m.Done(1, m.DoneStats("stop", completion_tokens=3))
    assert isinstance(bad_done, m.Invalid) and bad_done.kind == "DONE"
    assert isinstance(bad_token, m.Invalid) and bad_token.kind == "TOKEN"


@given(st.dictionaries(rids, st.integers(0, 2**32 - 1), max_size=20))
def test_credit_round_trip(grants):
    msg = m.decode(m.encode_credit(grants))
    assert msg.kind is m.Kind.CREDIT and msg.rid is None
    assert dict(m.decode_credit(msg.body)) == grants


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_garbage_batch_is_a_message_error_or_typed_records(data):
    try:
        out = m.from_worker([m.Kind.BATCH.value, b"", data])
    except m.MessageError:
        return
    assert all(isinstance(x, (m.Token, m.Done, m.Error, m.Parked, m.Logprobs, m.Invalid))
               for x in out.items)


def test_truncated_and_nested_batches_are_refused():
    body = m.encode_batch([(m.Kind.TOKEN, 1, b"hello")])[2]
    for cut in range(1, len(body)):
        with pytest.raises(m.MessageError, match="truncated"):
            m.from_worker([m.Kind.BATCH.value, b"", body[:cut]])
    nested = m.encode_batch([(m.Kind.BATCH, 1, body)])[2]
    with pytest.raises(m.MessageError, match="cannot travel"):
        m.from_worker([m.Kind.BATCH.value, b"", nested])
    with pytest.raises(m.MessageError, match="whole"):
        m.decode_credit(b"\x00" * 13)
    with pytest.raises(m.MessageError):
        m.decode([b"?", b"", b""])
