"""The binary protocol's front (PROTOCOL.md version 1): an adapter on the stream core.

A connection reads frames, turns each GENERATE into a ``GenRequest`` and opens a stream
on the gateway core (``gateway.Gateway.open``) with the connection as its ``Output``: the
core hands back TOKEN / LOGPROBS / DONE / ERROR events, rendered here as frames and
written by the connection's ``Channel`` (``streams.py``: one write per round, token
credit, slow clients).  A closed connection closes its streams.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from importlib.metadata import PackageNotFoundError, version as dist_version
from typing import Any

from llmctl.common import protocol as p
from llmctl.common.errors import (BadRequest, InternalError, LlmctlError, ProtocolError,
                                  TooManyStreams)
from llmctl.common.messages import Finished
from llmctl.common.protocol import Frame, FrameType
from llmctl.common.request import validate
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.streams import Channel, Stream, hard_limit, limit_output
from llmctl.dataplane.tenants import BINARY

log = logging.getLogger(__name__)


@functools.cache
def version() -> str:
    """The server's version, as a WELCOME names it (read from the package's metadata once)."""
    try:
        return dist_version("llmctl")
    except PackageNotFoundError:
        return "0"


class _Closed(Exception):
    """The peer went away."""


class Connection:
    """One client connection: the output of its streams, in frames."""

    def __init__(self, gw: Gateway, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.gw = gw
        self.cfg = gw.cfg.gateway
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, Stream] = {}     # by stream id
        self.tenant = ""                          # who its streams belong to (HELLO)
        self.peer = writer.get_extra_info("peername")
        limit_output(writer.transport, self.cfg.write_buffer_bytes)
        self.channel = Channel(gw, writer.transport, writer.drain,   # type: ignore[arg-type]
                               hard_limit(self.cfg.write_buffer_bytes))

    # ---- output (the streams' Output) ----------------------------------------------------
    def token(self, s: Stream, text: str) -> bytes:
        return p.token(s.tag, text)

    def logprobs(self, s: Stream, content: list[dict[str, Any]]) -> bytes:
        return p.logprobs(s.tag, content)

    def done(self, s: Stream, fin: Finished) -> bytes:
        self.streams.pop(s.tag, None)
        return p.done(s.tag, fin)

    def error(self, s: Stream, err: LlmctlError) -> bytes:
        self.streams.pop(s.tag, None)
        return p.error(s.tag, err)

    def _send(self, frame: bytes) -> None:
        self.channel.write(frame)
        self.channel.flush()

    # ---- input ------------------------------------------------------------------------
    async def _read_frame(self, header: bytes = b"") -> Frame:
        try:
            header += await self.reader.readexactly(p.HEADER_SIZE - len(header))
            length = p.check_length(header, self.cfg.max_frame)  # before reading the payload
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise _Closed() from None
        return p.decode_body(body)

    async def run(self, first: bytes = b"") -> None:
        """Serve the connection; ``first``: its bytes already read (``main.serve_binary``)."""
        self.gw.counters.connections += 1
        try:
            await self._serve(first)
        except Exception as exc:    # a bug: answer and log it, never a silent drop
            log.exception("%s: connection failed", self.peer)
            err = InternalError(f"internal error: {type(exc).__name__}")
            self.gw.note_error(err)
            self._send(p.error(0, err))
            await self._close()
        finally:
            self.gw.counters.connections -= 1

    async def _serve(self, first: bytes) -> None:
        try:
            try:
                frame = await asyncio.wait_for(self._read_frame(first),
                                               self.cfg.handshake_timeout_s)
            except asyncio.TimeoutError:
                log.info("%s: no HELLO within %.1fs: closing", self.peer,
                         self.cfg.handshake_timeout_s)
                return
            self._handshake(frame)
            while True:
                self._on_frame(await self._read_frame())
        except LlmctlError as err:
            # Connection-level errors: answer on stream 0, then close.
            self.gw.note_error(err)
            self._send(p.error(0, err))
            log.info("%s: %s: %s", self.peer, err.code.value, err.message)
        except _Closed:
            pass
        finally:
            for s in list(self.streams.values()):
                self.gw.close(s)
            self.streams.clear()
            await self._close()

    async def _close(self) -> None:
        try:
            if not self.writer.is_closing():
                await asyncio.wait_for(self.writer.drain(), 1.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass

    def _handshake(self, frame: Frame) -> None:
        if frame.type is not FrameType.HELLO or frame.stream != 0:
            raise ProtocolError("the first frame must be HELLO on stream 0")
        hello = p.parse_hello(frame.payload)      # the token is valid text, or Unauthorized
        # Whose streams these are ([[tenants]]); Unauthorized where a key is required.
        self.tenant = self.gw.tenancy.identify(hello.get("token") or None, BINARY)
        self._send(p.welcome(f"llmctl/{version()}", self.gw.model_name, self.cfg.max_frame,
                             self.cfg.max_streams, [sched.model for sched in self.gw.sched]))

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t is FrameType.GENERATE:
            if frame.stream == 0:
                raise ProtocolError("GENERATE needs a stream id > 0")
            self._generate(frame)
        elif t is FrameType.CANCEL:
            s = self.streams.get(frame.stream)
            if s is not None:
                self.gw.close(s)
        elif t is FrameType.PING:
            if frame.stream != 0 or len(frame.payload) > p.MAX_PING:
                raise ProtocolError("PING must be on stream 0 with at most 64 bytes")
            self._send(p.pong(frame.payload))
        else:  # a second HELLO
            raise ProtocolError(f"unexpected {t.name} after the handshake")

    def _generate(self, frame: Frame) -> None:
        stream = frame.stream
        try:
            if stream in self.streams:
                raise BadRequest(f"stream {stream} is already open")
            if len(self.streams) >= self.cfg.max_streams:
                raise TooManyStreams(f"at most {self.cfg.max_streams} open streams per connection")
            request = validate(p.parse_json(frame.payload, BadRequest), self.gw.generation)
        except LlmctlError as err:
            self.gw.note_error(err)
            self._send(p.error(stream, err))
            return
        try:
            self.streams[stream] = self.gw.open(request, self, self.channel, tag=stream,
                                                tenant=self.tenant)
        except LlmctlError as err:          # not ready, overloaded, shutting down: counted
            self._send(p.error(stream, err))
