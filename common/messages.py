"""Internal ZeroMQ messages between the gateway (ROUTER) and workers (DEALER).

A message is a multipart ``[kind, rid, body]``:

* ``kind``: one byte (``Kind``);
* ``rid``: the request id as 8 big-endian bytes, or empty when the message is about
  the worker itself;
* ``body``: JSON for control messages, raw UTF-8 for TOKEN.

Flow control (credit-based, ZeroMQ guide ch. 7): a worker grants the gateway
``slots`` credits in READY; the gateway spends one per GENERATE and gets it back with
the DONE or ERROR that ends the request.  The gateway never sends work without
credit, so no request waits inside a ZeroMQ pipe.

Per stream, a second credit carries a slow client's back-pressure to the worker: a
GENERATE grants a window of ``window`` TOKEN messages; the gateway returns CREDIT as
the client's connection takes the tokens.  A sequence whose window is spent pauses
(its slot stays held) while the worker's other sequences go on.

Parking: when a stream's window has stayed spent for ``[gateway] park_after_s`` the
gateway sends PARK; the worker frees the sequence's slot (its KV stays as a prompt
cache entry) and answers PARKED, which gives the credit back.  When the client takes
output again the gateway spends a credit of that worker on RESUME.

Per token, messages are batched both ways so that a decode step of N sequences
costs one ZeroMQ message, not N (each wakes I/O threads that share the cores with
the compute): a worker sends everything one engine step produced as one BATCH of
``(kind, rid, body)`` records; the gateway sends the token credit it owes a worker
as one CREDIT of ``(rid, n)`` pairs.

Two layers: ``encode``/``decode`` frame a message (``Message``: kind, rid, raw body);
``from_worker`` / ``from_gateway`` decode and validate a whole message once, at the
socket, into the typed messages below (``msgspec`` structs), refusing with
``MessageError`` what the receiving side must not get.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import msgspec

from llmctl.common.outcome import (  # noqa: F401  (the messages' bodies, as m.DoneStats ...)
    ComputeThreads, DoneStats, Finished, KvStoreStats, LogprobsBody, TokenLogprob, TopLogprob)
from llmctl.common.request import GenRequest

_RID = struct.Struct(">Q")
YIELD = b"yield"    # PARK's body when a running request yields its slot to a waiting one
_RECORD = struct.Struct(">cQI")     # BATCH record header: kind, rid, body length
_GRANT = struct.Struct(">QI")       # CREDIT pair: rid, n


class Kind(bytes, Enum):
    READY = b"R"       # worker -> gateway: loaded; body {worker, pid, slots, model, n_ctx, device}
    HEARTBEAT = b"H"   # both ways; any traffic counts as liveness
    GENERATE = b"G"    # gateway -> worker: rid, body = request fields
    CANCEL = b"C"      # gateway -> worker: rid
    TOKEN = b"T"       # worker -> gateway: rid, body = UTF-8 text piece
    DONE = b"D"        # worker -> gateway: rid, body = stats (returns a credit)
    ERROR = b"E"       # worker -> gateway: rid, body {code, message} (returns a credit)
    BYE = b"B"         # worker -> gateway: leaving; no more credits
    DRAIN = b"X"       # gateway -> worker: finish what you have, take nothing new
    CREDIT = b"K"      # gateway -> worker: body = packed (rid, n) pairs: n more TOKENs for rid
    BATCH = b"M"       # worker -> gateway: body = packed TOKEN/DONE/ERROR/PARKED records
    PARK = b"P"        # gateway -> worker: free rid's slot, keep it (its client takes nothing,
                       # or, with body YIELD, it yields its slot to waiting work)
    PARKED = b"Q"      # worker -> gateway: rid is parked (returns a credit; not an ending)
    RESUME = b"U"      # gateway -> worker: run parked rid again (spends a credit)
    DRAINING = b"Y"    # worker -> gateway: finishing what it has, send it nothing new
    LOGPROBS = b"L"    # worker -> gateway: rid, body {"content": [entry...]}: the logprobs
                       # of the tokens behind the next TOKEN (or DONE)


class MessageError(ValueError):
    """An internal message does not parse (a bug or a version mismatch)."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    rid: int | None = None
    body: bytes = b""


def dumps(body: dict[str, Any]) -> bytes:
    return _json.encode(body)


def encode(kind: Kind, rid: int | None = None, body: bytes | dict[str, Any] = b"") -> list[bytes]:
    if isinstance(body, dict):
        body = dumps(body)
    return [kind.value, _RID.pack(rid) if rid is not None else b"", body]


_KINDS = {k.value: k for k in Kind}


def decode(frames: list[bytes]) -> Message:
    if len(frames) != 3:
        raise MessageError(f"expected 3 frames, got {len(frames)}")
    kind_b, rid_b, body = frames
    kind = _KINDS.get(bytes(kind_b))
    if kind is None:
        raise MessageError(f"unknown message kind {bytes(kind_b)!r}")
    if rid_b and len(rid_b) != _RID.size:
        raise MessageError(f"bad request id length {len(rid_b)}")
    rid = _RID.unpack(rid_b)[0] if rid_b else None
    return Message(kind, rid, bytes(body))


def encode_batch(records: list[tuple[Kind, int, bytes]]) -> list[bytes]:
    """One BATCH message carrying several per-request messages."""
    parts = []
    for kind, rid, body in records:
        parts.append(_RECORD.pack(kind.value, rid, len(body)))
        parts.append(body)
    return [Kind.BATCH.value, b"", b"".join(parts)]


_IN_BATCH = {k.value: k for k in (Kind.TOKEN, Kind.DONE, Kind.ERROR, Kind.PARKED,
                                  Kind.LOGPROBS)}


def encode_credit(grants: dict[int, int]) -> list[bytes]:
    """One CREDIT message: ``grants[rid]`` more TOKEN messages for each stream."""
    return [Kind.CREDIT.value, b"", b"".join(_GRANT.pack(r, n) for r, n in grants.items())]


def decode_credit(body: bytes) -> list[tuple[int, int]]:
    if len(body) % _GRANT.size:
        raise MessageError(f"CREDIT body of {len(body)} bytes is not whole (rid, n) pairs")
    return [_GRANT.unpack_from(body, i) for i in range(0, len(body), _GRANT.size)]


# ---- typed messages ----------------------------------------------------------------------

class ReadyInfo(msgspec.Struct, frozen=True):
    """READY: the worker is loaded and warm; ``slots`` is its credit."""
    worker: str
    pid: int
    slots: int
    name: str = ""
    model: str = ""
    n_ctx: int = 0
    device: str = "cpu"
    node: str = ""           # the machine it runs on ([node] name)
    served: str = ""        # the configured model it serves ([[models]] name); "" = default
    threads: ComputeThreads | None = None    # None: an engine without CPU threads
    props: dict[str, Any] = {}   # the model's chat_template, bos/eos tokens, sizes (/props)




class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str = ""
    retry_after_ms: int | None = None


class Ready(msgspec.Struct, frozen=True):
    info: ReadyInfo


class Heartbeat(msgspec.Struct, frozen=True):
    pass


class Bye(msgspec.Struct, frozen=True):
    pass


class Draining(msgspec.Struct, frozen=True):
    """A node's worker is being stopped or replaced: it finishes what it holds."""


class Drain(msgspec.Struct, frozen=True):
    pass


class Generate(msgspec.Struct, frozen=True):
    rid: int
    request: GenRequest


class Cancel(msgspec.Struct, frozen=True):
    rid: int


class Park(msgspec.Struct, frozen=True):
    rid: int
    yields: bool = False    # a running request yields its slot (it has credit), not a stall


class Resume(msgspec.Struct, frozen=True):
    rid: int


class Credit(msgspec.Struct, frozen=True):
    grants: list[tuple[int, int]]


class Token(msgspec.Struct, frozen=True):
    rid: int
    text: str


class Done(msgspec.Struct, frozen=True):
    rid: int
    stats: DoneStats


class Error(msgspec.Struct, frozen=True):
    rid: int
    error: ErrorBody


class Parked(msgspec.Struct, frozen=True):
    rid: int


class Logprobs(msgspec.Struct, frozen=True):
    rid: int
    content: list[TokenLogprob]


class Invalid(msgspec.Struct, frozen=True):
    """A well-framed message for request ``rid`` whose body does not validate: the
    receiver ends that request with an error (so its credit comes back) and counts it."""
    rid: int
    kind: str
    why: str


class Batch(msgspec.Struct, frozen=True):
    items: list[Union[Token, Done, Error, Parked, Logprobs, Invalid]]


FromWorker = Union[Ready, Heartbeat, Bye, Batch, Token, Done, Error, Parked, Logprobs, Invalid,
                   Draining]
FromGateway = Union[Generate, Cancel, Credit, Park, Resume, Drain, Heartbeat, Invalid]

_json = msgspec.json.Encoder()
_ready = msgspec.json.Decoder(ReadyInfo)
_work = msgspec.json.Decoder(GenRequest)
_done = msgspec.json.Decoder(DoneStats)
_error = msgspec.json.Decoder(ErrorBody)
_logprobs = msgspec.json.Decoder(LogprobsBody)


def body(obj: msgspec.Struct) -> bytes:
    """The JSON body of a typed message part (a GenRequest, DoneStats, ...)."""
    return _json.encode(obj)


def _typed(decoder: msgspec.json.Decoder, msg: Message) -> Any:
    try:
        return decoder.decode(msg.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"{msg.kind.name} body: {exc}") from None


def _need_rid(msg: Message) -> int:
    if msg.rid is None:
        raise MessageError(f"{msg.kind.name} without a request id")
    return msg.rid


def _per_request(msg: Message) -> Token | Done | Error | Parked | Logprobs | Invalid:
    rid = _need_rid(msg)
    try:
        if msg.kind is Kind.TOKEN:
            try:
                return Token(rid, msg.body.decode("utf-8"))
            except UnicodeDecodeError:
                raise MessageError("TOKEN body is not UTF-8") from None
        if msg.kind is Kind.DONE:
            return Done(rid, _typed(_done, msg))
        if msg.kind is Kind.ERROR:
            return Error(rid, _typed(_error, msg))
        if msg.kind is Kind.LOGPROBS:
            return Logprobs(rid, _typed(_logprobs, msg).content)
    except MessageError as exc:
        return Invalid(rid, msg.kind.name, str(exc))
    return Parked(rid)


_TOKEN_B = Kind.TOKEN.value


def _batch_items(body: bytes) -> list[Token | Done | Error | Parked | Logprobs | Invalid]:
    """A BATCH's records, typed (``_per_request``), TOKEN records (nearly all of them)
    made straight from the bytes (the token hot path)."""
    out: list[Token | Done | Error | Parked | Logprobs | Invalid] = []
    off, end, size, unpack = 0, len(body), _RECORD.size, _RECORD.unpack_from
    while off < end:
        if off + size > end:
            raise MessageError("truncated BATCH record header")
        kind_b, rid, n = unpack(body, off)
        off += size
        if off + n > end:
            raise MessageError("truncated BATCH record body")
        if kind_b == _TOKEN_B:
            try:
                out.append(Token(rid, body[off:off + n].decode("utf-8")))
            except UnicodeDecodeError:
                out.append(Invalid(rid, "TOKEN", "TOKEN body is not UTF-8"))
        else:
            kind = _IN_BATCH.get(kind_b)
            if kind is None:
                raise MessageError(f"message kind {kind_b!r} cannot travel in a BATCH")
            out.append(_per_request(Message(kind, rid, body[off:off + n])))
        off += n
    return out


def from_worker(frames: list[bytes]) -> FromWorker:
    """A message a worker sent, decoded and validated; ``MessageError`` if it is not one."""
    msg = decode(frames)
    k = msg.kind
    if k is Kind.READY:
        return Ready(_typed(_ready, msg))
    if k is Kind.HEARTBEAT:
        return Heartbeat()
    if k is Kind.BYE:
        return Bye()
    if k is Kind.DRAINING:
        return Draining()
    if k is Kind.BATCH:
        return Batch(_batch_items(msg.body))
    if k in (Kind.TOKEN, Kind.DONE, Kind.ERROR, Kind.PARKED, Kind.LOGPROBS):
        return _per_request(msg)
    raise MessageError(f"a worker does not send {k.name}")


def from_gateway(frames: list[bytes]) -> FromGateway:
    """A message the gateway sent, decoded and validated; ``MessageError`` if it is not one."""
    msg = decode(frames)
    k = msg.kind
    if k is Kind.GENERATE:
        rid = _need_rid(msg)
        try:
            return Generate(rid, _typed(_work, msg))
        except MessageError as exc:
            return Invalid(rid, k.name, str(exc))
    if k is Kind.CANCEL:
        return Cancel(_need_rid(msg))
    if k is Kind.PARK:
        return Park(_need_rid(msg), yields=msg.body == YIELD)
    if k is Kind.RESUME:
        return Resume(_need_rid(msg))
    if k is Kind.CREDIT:
        return Credit(decode_credit(msg.body))
    if k is Kind.DRAIN:
        return Drain()
    if k is Kind.HEARTBEAT:
        return Heartbeat()
    raise MessageError(f"the gateway does not send {k.name}")


def ready(info: ReadyInfo) -> list[bytes]:
    return encode(Kind.READY, None, body(info))


def generate(rid: int, request: GenRequest) -> list[bytes]:
    return encode(Kind.GENERATE, rid, body(request))


def error(rid: int, err: Any) -> list[bytes]:
    """ERROR for ``rid`` from a typed error (``common.errors.LlmctlError``)."""
    return encode(Kind.ERROR, rid, body(ErrorBody(err.code.value, err.message,
                                                  err.retry_after_ms)))
