"""The raw TCP front: PROTOCOL.md version 1 over asyncio streams."""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from llmctl.common import protocol as p
from llmctl.common.errors import (BadRequest, InternalError, LlmctlError, ProtocolError,
                              TooManyStreams, Unauthorized)
from llmctl.common.protocol import Frame, FrameType
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.scheduler import Request
from llmctl.dataplane.transport import limit_output

log = logging.getLogger(__name__)


class _Closed(Exception):
    """The peer went away."""


class Connection:
    """One client connection; the sink of its streams' output."""

    def __init__(self, gw: Gateway, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.gw = gw
        self.cfg = gw.cfg.gateway
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, Request] = {}
        self.peer = writer.get_extra_info("peername")
        self._owed = asyncio.Event()
        self.transport = writer.transport
        self._pending: list[bytes] = []     # frames not yet written (see flush)
        self._tokens = False                # TOKEN frames among them: credit to give
        limit = self.cfg.write_buffer_bytes
        limit_output(writer.transport, limit)
        self._hard_limit = 4 * limit + p.MAX_PING + 1024
        self._grant_batch = max(1, gw.cfg.gateway.token_window // 4)

    # ---- output (Sink) --------------------------------------------------------------
    # TOKEN frames are queued (``on_token``) and written together when the gateway has
    # handled every worker message already waiting (``flush``): one write per connection
    # per round instead of one per token.  Under light load a round is one message, so
    # nothing waits; under load the frames that came together leave together, and the
    # syscalls per token fall as the rate rises.  Other frames flush what is queued first.
    def _write(self, data: bytes) -> None:
        self._pending.append(data)
        self.flush()

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if self.writer.is_closing():
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > self._hard_limit:
            # Only frames that are not token-credited (PONG, errors) can get here.
            log.warning("%s: write buffer over %d bytes: dropping the client", self.peer,
                        self._hard_limit)
            self._drop_slow_client()
            return
        if self._owed.is_set() or not self._tokens:
            return            # the slow path below already waits for this client
        self._tokens = False
        if not self.transport.get_write_buffer_size():
            # The kernel took everything, so the client keeps up: credit goes back
            # here, in batches of a quarter window, without waking a task per token.
            # Fewer wake-ups per token is CPU the compute threads keep.
            for req in self.streams.values():
                if req.owed >= self._grant_batch:
                    self.gw.grant(req, req.owed)
                    req.owed = 0
        else:
            self._owed.set()

    def _drop_slow_client(self) -> None:
        self.gw.counters.slow_clients += 1
        for req in list(self.streams.values()):
            self.gw.cancel(req)
        self.transport.abort()

    def on_token(self, req: Request, text: str) -> None:
        if not self._pending:
            self.gw.dirty.append(self)      # flushed at the end of the gateway's round
        self._pending.append(p.token(req.stream, text))
        self._tokens = True
        req.owed += 1

    async def _return_credit(self) -> None:
        """The slow path of token credit: the kernel refused bytes (the client's
        window is full), so credit is held until they are flushed (``drain()``);
        meanwhile the worker pauses those sequences, and the gateway parks and then
        cancels a stream that stays paused (``[gateway] park_after_s``,
        ``slow_client_timeout_s``)."""
        while True:
            await self._owed.wait()
            self._owed.clear()
            try:
                await self.writer.drain()
            except ConnectionError:
                return
            for req in self.streams.values():
                # Credit goes back in batches of a quarter window: fewer messages per
                # token, and the worker never runs dry while the client keeps up.
                if req.owed >= self._grant_batch:
                    self.gw.grant(req, req.owed)
                    req.owed = 0

    def on_logprobs(self, req: Request, content: list[dict[str, Any]]) -> None:
        if not self._pending:
            self.gw.dirty.append(self)      # written with the TOKEN it describes
        self._pending.append(p.logprobs(req.stream, content))

    def on_done(self, req: Request, stats: dict[str, Any]) -> None:
        self.streams.pop(req.stream, None)
        self._write(p.done(req.stream, stats))

    def on_error(self, req: Request, err: LlmctlError) -> None:
        self.streams.pop(req.stream, None)
        self._write(p.error(req.stream, err))

    # ---- input ----------------------------------------------------------------------
    async def _read_frame(self) -> Frame:
        try:
            header = await self.reader.readexactly(p.HEADER_SIZE)
            length = p.check_length(header, self.cfg.max_frame)  # before reading the payload
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise _Closed() from None
        return p.decode_body(body)

    async def run(self) -> None:
        self.gw.counters.connections += 1
        try:
            await self._serve()
        except Exception as exc:    # a bug: answer and log it, never a silent drop
            log.exception("%s: connection failed", self.peer)
            err = InternalError(f"internal error: {type(exc).__name__}")
            self.gw.note_error(err)
            self._write(p.error(0, err))
            await self._close()
        finally:
            self.gw.counters.connections -= 1

    async def _serve(self) -> None:
        crediter = asyncio.create_task(self._return_credit())
        try:
            try:
                frame = await asyncio.wait_for(self._read_frame(), self.cfg.handshake_timeout_s)
            except asyncio.TimeoutError:
                log.info("%s: no HELLO within %.1fs: closing", self.peer,
                         self.cfg.handshake_timeout_s)
                return
            self._handshake(frame)
            while True:
                frame = await self._read_frame()
                self._on_frame(frame)
        except LlmctlError as err:
            # Connection-level errors: answer on stream 0, then close.
            self.gw.note_error(err)
            self._write(p.error(0, err))
            log.info("%s: %s: %s", self.peer, err.code.value, err.message)
        except _Closed:
            pass
        finally:
            crediter.cancel()
            for req in list(self.streams.values()):
                self.gw.cancel(req)
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
        if self.cfg.token and not hmac.compare_digest(
                hello.get("token", "").encode(), self.cfg.token.encode()):
            raise Unauthorized("missing or wrong token")
        self._write(p.welcome(f"llmctl/{_version()}", self.gw.model_name,
                              self.cfg.max_frame, self.cfg.max_streams,
                              [sched.model for sched in self.gw.sched]))

    def _on_frame(self, frame: Frame) -> None:
        t = frame.type
        if t is FrameType.GENERATE:
            if frame.stream == 0:
                raise ProtocolError("GENERATE needs a stream id > 0")
            self._generate(frame)
        elif t is FrameType.CANCEL:
            req = self.streams.get(frame.stream)
            if req is not None:
                self.gw.cancel(req)
        elif t is FrameType.PING:
            if frame.stream != 0 or len(frame.payload) > p.MAX_PING:
                raise ProtocolError("PING must be on stream 0 with at most 64 bytes")
            self._write(p.pong(frame.payload))
        else:  # a second HELLO
            raise ProtocolError(f"unexpected {t.name} after the handshake")

    def _generate(self, frame: Frame) -> None:
        stream = frame.stream
        try:
            if stream in self.streams:
                raise BadRequest(f"stream {stream} is already open")
            if len(self.streams) >= self.cfg.max_streams:
                raise TooManyStreams(f"at most {self.cfg.max_streams} open streams per connection")
            params = p.parse_generate(frame.payload, self.gw.defaults)
        except LlmctlError as err:
            self.gw.note_error(err)
            self._write(p.error(stream, err))
            return
        try:
            self.streams[stream] = self.gw.submit(params, self, stream)
        except LlmctlError as err:          # not ready, overloaded, shutting down: counted
            self._write(p.error(stream, err))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llmctl")
    except PackageNotFoundError:
        return "0"


async def serve_tcp(gw: Gateway) -> asyncio.AbstractServer:
    cfg = gw.cfg.gateway

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(gw, reader, writer).run()

    server = await asyncio.start_server(handle, cfg.host, cfg.port, reuse_address=True)
    log.info("binary protocol listening on %s",
             ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets))
    return server
