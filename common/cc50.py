"""The CC50 framing of ``waqasm86/cuda-tcp-llama.cpp`` (docs/protocol.md, "CC50"): codec and
a client (``llmctl bench --target cc50://HOST:PORT``, the tests).

A message is a 24-byte header in little-endian order, then ``length`` bytes of payload:

    magic u32 = 0x30354343 ("CC50") | version u16 = 1 | type u16 | req_id u64 |
    flags u32 | length u32

``REQ_INFER`` (1) carries ``max_tokens u32, credit_bytes u32, prompt_len u32`` and the
prompt's bytes; the server answers ``RESP_CHUNK`` (2, text), then ``RESP_DONE`` (3:
``tokens u32, reserved u32, elapsed_us u64``) or ``RESP_ERR`` (4, a message).
"""
from __future__ import annotations

import asyncio
import itertools
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

MAGIC = 0x30354343
MAGIC_BYTES = struct.pack("<I", MAGIC)         # b"CC50": a connection's first four bytes
VERSION = 1
HEADER = struct.Struct("<IHHQII")              # magic, version, type, req_id, flags, length
INFER = struct.Struct("<III")                  # max_tokens, credit_bytes, prompt_len
DONE = struct.Struct("<IIQ")                   # tokens, reserved, elapsed_us
DEFAULT_CREDIT_BYTES = 256 * 1024              # a request's credit_bytes of 0 means this


class MsgType(IntEnum):
    REQ_INFER = 1
    RESP_CHUNK = 2
    RESP_DONE = 3
    RESP_ERR = 4


class Cc50Error(ValueError):
    """A header or payload that is not CC50."""


def encode(mtype: int, req_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, mtype, req_id, 0, len(payload)) + payload


def decode_header(data: bytes, max_length: int) -> tuple[int, int, int]:
    """(type, req_id, length) of a 24-byte header, or Cc50Error naming what is wrong."""
    magic, version, mtype, req_id, _flags, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise Cc50Error(f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}, \"CC50\")")
    if version != VERSION:
        raise Cc50Error(f"unsupported version {version} (this server speaks {VERSION})")
    if length > max_length:
        raise Cc50Error(f"payload length {length} exceeds the limit of {max_length}")
    return mtype, req_id, length


def infer(req_id: int, prompt: str, max_tokens: int = 0, credit_bytes: int = 0) -> bytes:
    data = prompt.encode("utf-8")
    return encode(MsgType.REQ_INFER, req_id, INFER.pack(max_tokens, credit_bytes, len(data)) + data)


def done(req_id: int, tokens: int, elapsed_us: int) -> bytes:
    return encode(MsgType.RESP_DONE, req_id, DONE.pack(tokens, 0, elapsed_us))


@dataclass
class Answer:
    """One request's answer as a client received it."""
    chunks: list[bytes] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)    # perf_counter() at arrival
    tokens: int | None = None           # RESP_DONE's
    elapsed_us: int | None = None
    error: str | None = None            # RESP_ERR's message
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


class Client:
    """An asyncio CC50 client: several requests in flight on one connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._ids = itertools.count(1)
        self._answers: dict[int, Answer] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self.closed = asyncio.Event()

    async def connect(self) -> "Client":
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._task = asyncio.create_task(self._read())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()

    def send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    def submit(self, prompt: str, max_tokens: int = 0, credit_bytes: int = 0,
               req_id: int | None = None) -> tuple[int, Answer]:
        rid = next(self._ids) if req_id is None else req_id
        ans = self._answers[rid] = Answer()
        self.send(infer(rid, prompt, max_tokens, credit_bytes))
        return rid, ans

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                mtype, rid, length = decode_header(
                    await self._reader.readexactly(HEADER.size), 1 << 30)
                payload = await self._reader.readexactly(length)
                ans = self._answers.get(rid)
                if ans is None:
                    continue
                if mtype == MsgType.RESP_CHUNK:
                    ans.chunks.append(payload)
                    ans.chunk_times.append(time.perf_counter())
                elif mtype == MsgType.RESP_DONE:
                    ans.tokens, _, ans.elapsed_us = DONE.unpack(payload)
                    ans.done.set()
                elif mtype == MsgType.RESP_ERR:
                    ans.error = payload.decode("utf-8", "replace")
                    ans.done.set()
        except (asyncio.IncompleteReadError, ConnectionError, Cc50Error):
            pass
        finally:
            self.closed.set()
            for ans in self._answers.values():
                if not ans.done.is_set():
                    ans.error = ans.error or "connection closed"
                    ans.done.set()
