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
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any

_RID = struct.Struct(">Q")


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
    CREDIT = b"K"      # gateway -> worker: rid, body {"n": k}: k more TOKEN messages may be sent


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


def encode(kind: Kind, rid: int | None = None, body: bytes | dict[str, Any] = b"") -> list[bytes]:
    if isinstance(body, dict):
        body = json.dumps(body, separators=(",", ":")).encode("utf-8")
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


# ---- control socket (CLI <-> supervisor, supervisor <-> gateway admin) -----------------

def request(cmd: str, **args: Any) -> bytes:
    return json.dumps({"cmd": cmd, **args}).encode("utf-8")


def reply(ok: bool, **data: Any) -> bytes:
    return json.dumps({"ok": ok, **data}).encode("utf-8")


def parse(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise MessageError(f"control message is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError("control message is not an object")
    return obj
