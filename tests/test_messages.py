"""Internal gateway <-> worker messages (common/messages.py): round trips, garbage."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.common import messages as m

rids = st.integers(0, 2**64 - 1)
records = st.lists(st.tuples(st.sampled_from([m.Kind.TOKEN, m.Kind.DONE, m.Kind.ERROR]), rids,
                             st.binary(max_size=64)), max_size=20)


@given(st.sampled_from(list(m.Kind)), st.one_of(st.none(), rids), st.binary(max_size=64))
def test_message_round_trip(kind, rid, body):
    assert m.decode(m.encode(kind, rid, body)) == m.Message(kind, rid, body)


@given(records)
def test_batch_round_trip(recs):
    msg = m.decode(m.encode_batch(recs))
    assert msg.kind is m.Kind.BATCH
    assert m.decode_batch(msg.body) == [m.Message(k, r, b) for k, r, b in recs]


@given(st.dictionaries(rids, st.integers(0, 2**32 - 1), max_size=20))
def test_credit_round_trip(grants):
    msg = m.decode(m.encode_credit(grants))
    assert msg.kind is m.Kind.CREDIT and msg.rid is None
    assert dict(m.decode_credit(msg.body)) == grants


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_garbage_batch_is_a_message_error_or_records(data):
    try:
        out = m.decode_batch(data)
    except m.MessageError:
        return
    assert all(x.kind in (m.Kind.TOKEN, m.Kind.DONE, m.Kind.ERROR) for x in out)


def test_truncated_and_nested_batches_are_refused():
    body = m.encode_batch([(m.Kind.TOKEN, 1, b"hello")])[2]
    for cut in range(1, len(body)):
        with pytest.raises(m.MessageError, match="truncated"):
            m.decode_batch(body[:cut])
    nested = m.encode_batch([(m.Kind.BATCH, 1, body)])[2]
    with pytest.raises(m.MessageError, match="cannot travel"):
        m.decode_batch(nested)
    with pytest.raises(m.MessageError, match="whole"):
        m.decode_credit(b"\x00" * 13)
    with pytest.raises(m.MessageError):
        m.decode([b"?", b"", b""])
