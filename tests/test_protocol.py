"""The wire protocol module: round trips, limits and garbage input."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.common import protocol as p
from llmctl.common.errors import BadRequest, Code, FrameTooLarge, ProtocolError
from llmctl.common.protocol import Defaults, FrameDecoder, FrameType

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


D = Defaults(max_tokens=16, temperature=0.5, top_p=0.9, top_k=10, deadline_ms=1000,
             max_deadline_ms=5000)


def test_generate_defaults_and_fields():
    r = p.parse_generate(b'{"prompt": "hi", "unknown_key": 1}', D)
    assert (r.prompt, r.max_tokens, r.temperature, r.top_p, r.top_k, r.deadline_ms, r.stop) == \
        ("hi", 16, 0.5, 0.9, 10, 1000, ())
    r = p.parse_generate(json.dumps({"messages": [{"role": "user", "content": "x"}],
                                     "max_tokens": 3, "stop": "\n", "seed": 7}).encode(), D)
    assert r.messages == (("user", "x"),) and r.stop == ("\n",) and r.seed == 7
    assert r.worker_fields()["messages"] == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body", [
    {}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, {"prompt": 5},
    {"messages": []}, {"messages": [{"role": "user"}]}, {"prompt": "a", "max_tokens": 0},
    {"prompt": "a", "max_tokens": True}, {"prompt": "a", "temperature": -1},
    {"prompt": "a", "top_p": 2}, {"prompt": "a", "stop": [""]}, {"prompt": "a", "seed": -1},
    {"prompt": "a", "deadline_ms": 5001}, {"prompt": "a", "stop": ["x"] * 17},
])
def test_generate_rejects(body):
    with pytest.raises(BadRequest):
        p.parse_generate(json.dumps(body).encode(), D)


def test_generate_rejects_non_json():
    for raw in (b"not json", b"[1]", b"\xc3\x28"):
        with pytest.raises(BadRequest):
            p.parse_generate(raw, D)


def test_error_frame_shape():
    from llmctl.common.errors import Overloaded
    frame = p.error(3, Overloaded("full", retry_after_ms=120))
    f = FrameDecoder(allowed=p.SERVER_TYPES).feed(frame)[0]
    assert f.type is FrameType.ERROR and f.stream == 3
    assert json.loads(f.payload) == {"code": "overloaded", "message": "full", "retry_after_ms": 120}
