"""The wire protocol module: round trips, limits and garbage input."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.common import protocol as p
from llmctl.common.errors import BadRequest, Code, FrameTooLarge, ProtocolError
from llmctl.common.protocol import FrameDecoder, FrameType

ALL_TYPES = p.CLIENT_TYPES | p.SERVER_TYPES


@given(ftype=st.sampled_from(sorted(ALL_TYPES)), stream=st.integers(0, 0xFFFFFFFF),
       payload=st.binary(max_size=4096))
def test_round_trip(ftype, stream, payload):
    data = p.encode_frame(ftype, stream, payload)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    frames = FrameDecoder(allowed=frozenset(ALL_TYPES)).feed(data)
    assert frames == [p.Frame(FrameType(ftype), stream, payload)]


@given(chunks=st.lists(st.tuples(st.sampled_from(sorted(p.CLIENT_TYPES)),
                                 st.integers(0, 100), st.binary(max_size=300)), max_size=20),
       cut=st.integers(1, 64))
def test_decoder_handles_any_split(chunks, cut):
    data = b"".join(p.encode_frame(t, s, b) for t, s, b in chunks)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), cut):
        out.extend(dec.feed(data[i:i + cut]))
    assert [(f.type, f.stream, f.payload) for f in out] == [(FrameType(t), s, b) for t, s, b in chunks]
    assert dec.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_garbage_raises_only_protocol_errors(data):
    dec = FrameDecoder(max_frame=1 << 20)
    try:
        dec.feed(data)
    except ProtocolError as err:  # FrameTooLarge is a ProtocolError
        assert err.code in (Code.PROTOCOL, Code.TOO_LARGE)


def test_http_request_reads_as_too_large_without_allocating():
    header = b"GET / HTTP/1.1\r\n"[:4]
    with pytest.raises(FrameTooLarge) as exc:
        p.check_length(header, 1 << 20)
    assert "1195725856" in exc.value.message and exc.value.code is Code.TOO_LARGE


@pytest.mark.parametrize("length", [0, 1, 4])
def test_length_below_minimum_is_protocol(length):
    with pytest.raises(ProtocolError) as exc:
        p.check_length(struct.pack(">I", length), 1 << 20)
    assert exc.value.code is Code.PROTOCOL


def test_unknown_type_and_wrong_direction():
    with pytest.raises(ProtocolError, match="unknown frame type 0x7f"):
        p.decode_body(bytes([0x7F, 0, 0, 0, 0]))
    with pytest.raises(ProtocolError, match="not valid in this direction"):
        p.decode_body(bytes([FrameType.TOKEN, 0, 0, 0, 1]))


def test_hello_version_and_token():
    assert p.parse_hello(b'{"version": 1, "client": "x", "extra": 5}')["client"] == "x"
    for bad in (b'{"version": 2}', b'{"version": true}', b"[]", b"\xff", b'{"version":1,"token":3}'):
        with pytest.raises(ProtocolError):
            p.parse_hello(bad)


def test_error_frame_shape():
    from llmctl.common.errors import Overloaded
    frame = p.error(3, Overloaded("full", retry_after_ms=120))
    f = FrameDecoder(allowed=p.SERVER_TYPES).feed(frame)[0]
    assert f.type is FrameType.ERROR and f.stream == 3
    assert json.loads(f.payload) == {"code": "overloaded", "message": "full", "retry_after_ms": 120}
