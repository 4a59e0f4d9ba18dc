"""The client wire protocol, version 1 (see docs/protocol.md and ../shared/PROTOCOL.md).

Pure encode/decode functions, no I/O.  A frame is

    u32 length (big-endian, bytes after this field, >= 5) | u8 type | u32 stream | payload

Decoding raises ``ProtocolError`` (code ``protocol``) or ``FrameTooLarge`` (code
``too_large``); a GENERATE's payload is a request object (``common/request.py``).
"""
from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any, NamedTuple

import msgspec

from llmctl.common.errors import FrameTooLarge, LlmctlError, ProtocolError, Unauthorized
from llmctl.common.request import text_field

__all__ = [
    "VERSION", "FrameType", "Frame", "FrameDecoder", "ProtocolError", "FrameTooLarge",
    "encode_frame", "check_length", "decode_body", "parse_hello", "json_payload", "parse_json",
]

VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20
HEADER_SIZE = 4            # the length field
MIN_LENGTH = 5             # type + stream
MAX_PING = 64
MAX_STREAM = 0xFFFFFFFF

_LEN = struct.Struct(">I")
_BODY_HEAD = struct.Struct(">BI")


class FrameType(IntEnum):
    HELLO = 0x01
    GENERATE = 0x02
    CANCEL = 0x03
    PING = 0x04
    WELCOME = 0x81
    TOKEN = 0x82
    DONE = 0x83
    ERROR = 0x84
    PONG = 0x85
    LOGPROBS = 0x86    # only on streams whose GENERATE asked for logprobs


CLIENT_TYPES = frozenset({FrameType.HELLO, FrameType.GENERATE, FrameType.CANCEL, FrameType.PING})
SERVER_TYPES = frozenset(set(FrameType) - CLIENT_TYPES)


class Frame(NamedTuple):
    type: FrameType
    stream: int
    payload: bytes = b""


def encode_frame(ftype: int, stream: int, payload: bytes = b"") -> bytes:
    if not 0 <= stream <= MAX_STREAM:
        raise ValueError(f"stream id {stream} out of range")
    return _LEN.pack(MIN_LENGTH + len(payload)) + _BODY_HEAD.pack(int(ftype), stream) + payload


def check_length(header: bytes, max_frame: int) -> int:
    """Validate the 4-byte length field before the rest of the frame is read."""
    (length,) = _LEN.unpack(header)
    if length > max_frame:
        raise FrameTooLarge(f"frame length {length} exceeds max_frame {max_frame}")
    if length < MIN_LENGTH:
        raise ProtocolError(f"frame length {length} is below the minimum of {MIN_LENGTH}")
    return length


_TYPES = {int(t): t for t in FrameType}


def decode_body(body: bytes, allowed: frozenset[FrameType] = CLIENT_TYPES) -> Frame:
    """Decode type + stream + payload (the bytes the length field counted)."""
    if len(body) < MIN_LENGTH:
        raise ProtocolError("truncated frame")
    ftype, stream = _BODY_HEAD.unpack_from(body)
    t = _TYPES.get(ftype)
    if t is None:
        raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
    if t not in allowed:
        raise ProtocolError(f"frame type {t.name} is not valid in this direction")
    return Frame(t, stream, bytes(body[MIN_LENGTH:]))


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the complete frames so far."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME,
                 allowed: frozenset[FrameType] = CLIENT_TYPES) -> None:
        self.max_frame = max_frame
        self.allowed = allowed
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames = []
        off, end = 0, len(buf)
        try:
            while end - off >= HEADER_SIZE:
                length = check_length(bytes(buf[off:off + HEADER_SIZE]), self.max_frame)
                if end - off < HEADER_SIZE + length:
                    break
                start = off + HEADER_SIZE
                off = start + length
                frames.append(decode_body(bytes(buf[start:off]), self.allowed))
        finally:
            del buf[:off]            # once per feed, not once per frame
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


# ---- JSON payloads -----------------------------------------------------------------

def json_payload(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


MAX_JSON_DEPTH = 64        # nesting of objects and arrays a JSON payload may have


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of a decoded JSON value (stops counting past ``limit``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        children = o.values() if isinstance(o, dict) else o if isinstance(o, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            break
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def parse_json(payload: bytes, error: type[LlmctlError] = ProtocolError) -> dict[str, Any]:
    """A UTF-8 JSON object nested at most ``MAX_JSON_DEPTH`` deep, or ``error``."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except RecursionError:
        raise error(f"payload nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise error("payload must be a JSON object")
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise error(f"payload nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def parse_hello(payload: bytes) -> dict[str, Any]:
    hello = parse_json(payload)
    version = hello.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (server speaks {VERSION})")
    token = hello.get("token", "")
    if not isinstance(token, str):
        raise ProtocolError("HELLO token must be a string")
    text_field(token, "HELLO token", Unauthorized)
    return hello


# ---- server frames -------------------------------------------------------------------

def welcome(server: str, model: str, max_frame: int, max_streams: int,
            models: list[str] | None = None) -> bytes:
    """WELCOME: ``model`` is the default model, ``models`` every served one (first =
    the default)."""
    return encode_frame(FrameType.WELCOME, 0, json_payload({
        "version": VERSION, "server": server, "model": model,
        "models": models if models is not None else [model],
        "max_frame": max_frame, "max_streams": max_streams}))


_struct_json = msgspec.json.Encoder()
_FRAME_HEAD = struct.Struct(">IBI")      # length, type, stream: a whole frame header
_TOKEN_TYPE = int(FrameType.TOKEN)


def token(stream: int, text: str) -> bytes:
    """A TOKEN frame (the hot path: ``stream`` is one the client opened, in range)."""
    data = text.encode("utf-8")
    return _FRAME_HEAD.pack(MIN_LENGTH + len(data), _TOKEN_TYPE, stream) + data


def logprobs(stream: int, content: list[dict[str, Any]]) -> bytes:
    return encode_frame(FrameType.LOGPROBS, stream, json_payload({"content": content}))


def done(stream: int, stats: msgspec.Struct | dict[str, Any]) -> bytes:
    body = _struct_json.encode(stats) if isinstance(stats, msgspec.Struct) else json_payload(stats)
    return encode_frame(FrameType.DONE, stream, body)


def error(stream: int, err: LlmctlError) -> bytes:
    return encode_frame(FrameType.ERROR, stream, json_payload(err.to_dict()))


def pong(payload: bytes) -> bytes:
    return encode_frame(FrameType.PONG, 0, payload)


# ---- client frames (used by tools/ and tests) -----------------------------------------

def hello(client: str = "llmctl/1.0", token_: str | None = None) -> bytes:
    body: dict[str, Any] = {"version": VERSION, "client": client}
    if token_:
        body["token"] = token_
    return encode_frame(FrameType.HELLO, 0, json_payload(body))


def generate(stream: int, **fields: Any) -> bytes:
    return encode_frame(FrameType.GENERATE, stream,
                        json_payload({k: v for k, v in fields.items() if v is not None}))


def cancel(stream: int) -> bytes:
    return encode_frame(FrameType.CANCEL, stream)


def ping(payload: bytes = b"") -> bytes:
    return encode_frame(FrameType.PING, 0, payload)
