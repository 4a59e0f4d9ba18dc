"""Fuzzing the wire protocol: the pure decoder, the request validation, a live connection.

* The decoder and the JSON payload parsers, fed arbitrary bytes and arbitrary JSON (lone
  surrogates and deep nesting included), raise nothing but the protocol's typed errors.
* A live gateway is sent the hostile inputs kept in ``tests/corpus/wire.json`` (each with
  the answer it must get) and hypothesis-made frame sequences; every connection is
  answered or closed, the worker keeps its pid and serves the next request, and the
  logs show no exception (checked when the service stops).
"""
from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.common import protocol as p
from llmctl.common.errors import LlmctlError
from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest
from llmctl.common.protocol import FrameDecoder, FrameType
from llmctl.common.request import validate
from tests.service import Service

# Hypothesis's time-based checks fail on a loaded 2-core machine: timing is no pass/fail
# criterion here (the guide), only behaviour is.
NO_TIMING = [HealthCheck.too_slow]
CORPUS = json.loads((Path(__file__).parent / "corpus" / "wire.json").read_text())["entries"]

# Strings with lone surrogates among ordinary text: legal JSON escapes, invalid Unicode.
surrogate_text = st.lists(st.one_of(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                                    st.characters(codec="utf-8")), max_size=12).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | surrogate_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(surrogate_text, inner, max_size=4),
    max_leaves=30)
generate_like = st.fixed_dictionaries({}, optional={
    "prompt": json_values, "messages": json_values, "stop": json_values,
    "max_tokens": json_values, "temperature": json_values, "top_p": json_values,
    "top_k": json_values, "seed": json_values, "deadline_ms": json_values})


def corpus_bytes(entry: dict) -> bytes:
    if "hex" in entry:
        return bytes.fromhex(entry["hex"])
    out = b""
    for part in entry["parts"]:
        out += bytes.fromhex(part["repeat"]) * part["times"] if isinstance(part, dict) \
            else bytes.fromhex(part)
    return out


# ---- the pure functions -----------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=NO_TIMING)
@given(st.lists(st.binary(max_size=64), max_size=16), st.integers(64, 1 << 20))
def test_decoder_raises_only_protocol_errors(chunks, max_frame):
    dec = FrameDecoder(max_frame)
    try:
        for chunk in chunks:
            for f in dec.feed(chunk):
                assert f.type in p.CLIENT_TYPES and 0 <= f.stream <= p.MAX_STREAM
    except (p.ProtocolError, p.FrameTooLarge):
        pass
    assert dec.pending <= max_frame + p.HEADER_SIZE


def parse_generate(payload: bytes):
    """A GENERATE payload as the binary front reads it."""
    return validate(p.parse_json(payload, BadRequest), GenerationConfig())


@settings(max_examples=400, deadline=None, suppress_health_check=NO_TIMING)
@given(st.one_of(st.binary(max_size=200), generate_like.map(lambda d: json.dumps(d).encode())))
def test_generate_validation_raises_only_typed_errors(payload):
    try:
        req = parse_generate(payload)
    except LlmctlError:
        return
    for text in (req.prompt or "", *req.stop,
                 *(x for m in req.messages or () for x in (m.role, m.content))):
        text.encode("utf-8")                  # whatever passes is valid Unicode


@settings(max_examples=300, deadline=None, suppress_health_check=NO_TIMING)
@given(st.one_of(st.binary(max_size=200),
                 st.fixed_dictionaries({"version": json_values}, optional={
                     "token": json_values, "client": json_values}).map(
                     lambda d: json.dumps(d).encode())))
def test_hello_validation_raises_only_typed_errors(payload):
    try:
        hello = p.parse_hello(payload)
    except LlmctlError:
        return
    hello.get("token", "").encode("utf-8")


@pytest.mark.parametrize("depth", [1, 63, 64, 65, 100_000])
def test_json_nesting_limit(depth):
    """The object itself is depth 1; ``depth - 1`` nested arrays beside its prompt."""
    doc = b'{"prompt": "x", "extra": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}" \
        if depth > 1 else b'{"prompt": "x"}'
    if depth <= p.MAX_JSON_DEPTH:
        assert parse_generate(doc).prompt == "x"
    else:
        with pytest.raises(LlmctlError, match="nests deeper"):
            parse_generate(doc)


# ---- a live connection ------------------------------------------------------------------

@pytest.fixture(scope="module")
def svc():
    s = Service(workers={"count": 1, "slots": 2}, gateway={"handshake_timeout_s": 1.0})
    r = s.start()
    assert r.returncode == 0, r.stdout + r.stderr
    s.worker_pid = s.status()["workers"][0]["pid"]
    yield s
    s.stop()


def exchange(s: Service, data: bytes, wait: float = 5.0) -> tuple[list[p.Frame], bool]:
    """Send ``data`` on a fresh connection; (the frames answered, closed by the server?)."""
    so = socket.create_connection(("127.0.0.1", s.port), timeout=wait)
    dec = FrameDecoder(1 << 24, allowed=p.SERVER_TYPES)
    frames: list[p.Frame] = []
    try:
        try:
            so.sendall(data)
        except OSError:              # the server closed while we were still sending
            pass
        while True:
            try:
                chunk = so.recv(65536)
            except socket.timeout:
                return frames, False
            except ConnectionResetError:
                return frames, True
            if not chunk:
                return frames, True
            frames += dec.feed(chunk)     # every byte the server sends is a valid frame
            ends = [f for f in frames if f.type in (FrameType.ERROR, FrameType.DONE,
                                                     FrameType.PONG) and f.stream != 0]
            if ends or any(f.type is FrameType.PONG for f in frames):
                return frames, False
    finally:
        so.close()


def still_serving(s: Service) -> None:
    assert s.status()["workers"][0]["pid"] == s.worker_pid
    with s.client() as c:
        r = c.complete(1, prompt="Once upon a time", max_tokens=2, temperature=0)
    assert r.done is not None, r


@pytest.mark.integration
@pytest.mark.parametrize("entry", CORPUS, ids=[e["name"] for e in CORPUS])
def test_corpus_of_hostile_inputs_is_answered(svc, entry):
    frames, closed = exchange(svc, corpus_bytes(entry))
    want = entry["expect"]
    if "pong" in want:
        assert [f.payload for f in frames if f.type is FrameType.PONG] == [want["pong"].encode()]
    else:
        errors = [f for f in frames if f.type is FrameType.ERROR and f.stream == want["stream"]]
        assert errors, (entry["name"], frames)
        assert json.loads(errors[0].payload)["code"] == want["code"]
        if want.get("closed"):
            assert closed, f"{entry['name']}: the connection should be closed"
    still_serving(svc)


def frame_bytes(ftype: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", 5 + len(payload), ftype, stream) + payload


frames_strategy = st.lists(st.tuples(
    st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x00, 0x05, 0x81, 0xFF]),
    st.sampled_from([0, 1, 2, 0xFFFFFFFF]),
    st.one_of(st.binary(max_size=80),
              generate_like.map(lambda d: json.dumps({**d, "max_tokens": 2}).encode()))),
    min_size=1, max_size=6)


@pytest.mark.integration
@settings(max_examples=60, deadline=None, suppress_health_check=[*NO_TIMING, HealthCheck.function_scoped_fixture])
@given(hello=st.booleans(), frames=frames_strategy, tail=st.binary(max_size=12))
def test_fuzzed_frame_sequences_never_hurt_the_gateway(svc, hello, frames, tail):
    data = (p.hello() if hello else b"") + b"".join(frame_bytes(*f) for f in frames) + tail
    exchange(svc, data, wait=1.5)


@pytest.mark.integration
def test_after_the_fuzzing_the_worker_is_the_same_and_serves(svc):
    still_serving(svc)
