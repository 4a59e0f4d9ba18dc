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
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any

_RID = struct.Struct(">Q")
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
    PARK = b"P"        # gateway -> worker: rid's client takes nothing: free its slot, keep it
    PARKED = b"Q"      # worker -> gateway: rid is parked (returns a credit; not an ending)
    RESUME = b"U"      # gateway -> worker: run parked rid again (spends a credit)


class MessageError(ValueError):
    """An internal message does not parse (a bug or a version mismatch)."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    rid: int | None = None
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        obj = json.loads(self.body)
        if not isinstance(obj, dict):
            raise MessageError(f"{self.kind.name} body is not an object")
        return obj

    def text(self) -> str:
        return self.body.decode("utf-8")


def dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def encode(kind: Kind, rid: int | None = None, body: bytes | dict[str, Any] = b"") -> list[bytes]:
    if isinstance(body, dict):
        body = dumps(body)
    return [kind.value, _RID.pack(rid) if rid is not None else b"", body]


def decode(frames: list[bytes]) -> Message:
    if len(frames) != 3:
        raise MessageError(f"expected 3 frames, got {len(frames)}")
    kind_b, rid_b, body = frames
    try:
        kind = Kind(bytes(kind_b))
    except ValueError:
        raise MessageError(f"unknown message kind {bytes(kind_b)!r}") from None
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


def decode_batch(body: bytes) -> list[Message]:
    out, off, end = [], 0, len(body)
    while off < end:
        if off + _RECORD.size > end:
            raise MessageError("truncated BATCH record header")
        kind_b, rid, n = _RECORD.unpack_from(body, off)
        off += _RECORD.size
        if off + n > end:
            raise MessageError("truncated BATCH record body")
        try:
            kind = Kind(kind_b)
        except ValueError:
            raise MessageError(f"unknown message kind {kind_b!r} in BATCH") from None
        if kind not in (Kind.TOKEN, Kind.DONE, Kind.ERROR, Kind.PARKED):
            raise MessageError(f"{kind.name} cannot travel in a BATCH")
        out.append(Message(kind, rid, body[off:off + n]))
        off += n
    return out


def encode_credit(grants: dict[int, int]) -> list[bytes]:
    """One CREDIT message: ``grants[rid]`` more TOKEN messages for each stream."""
    return [Kind.CREDIT.value, b"", b"".join(_GRANT.pack(r, n) for r, n in grants.items())]


def decode_credit(body: bytes) -> list[tuple[int, int]]:
    if len(body) % _GRANT.size:
        raise MessageError(f"CREDIT body of {len(body)} bytes is not whole (rid, n) pairs")
    return [_GRANT.unpack_from(body, i) for i in range(0, len(body), _GRANT.size)]


# ---- control socket (CLI <-> supervisor, supervisor <-> gateway admin) -----------------

def parse(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise MessageError(f"control message is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError("control message is not an object")
    return obj
