"""The client of the wire protocol (PROTOCOL.md v1): one implementation, asyncio at its core.

* ``Connection`` (asyncio): ``await Connection.open(host, port, token=...)`` connects and
  does HELLO/WELCOME (``hello=False``: later, with ``await conn.hello(token)``). Bytes are
  decoded as the event loop receives them (no reader task woken per read: a load generator
  at tens of thousands of tokens a second shares the CPU with what it measures); every
  frame is timestamped on arrival (``time.perf_counter``) and handed to the stream
  waiting for it (``request``, ``collect``), to ``ping``, or else to ``recv_frame()``.
  ``stray_endings`` counts the DONE/ERROR frames that came for a stream whose end had
  already been collected: a request answered twice.

The same connection, blocking, for tests and scripts: ``sync_client.Client``.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from llmctl.common import protocol as p
from llmctl.common.errors import LlmctlError
from llmctl.common.protocol import Frame, FrameDecoder, FrameType

__all__ = ["Connection", "Result", "ServerError", "now"]

now = time.perf_counter
NAME = "llmctl-client/1.0"
MAX_FRAME = 1 << 24           # what this client accepts from a server
ENDED_MEMORY = 1 << 16        # ended streams remembered, to tell a second ending


class ServerError(Exception):
    """The server refused on stream 0 (the handshake, or the connection itself)."""

    def __init__(self, stream: int, body: dict[str, Any]) -> None:
        super().__init__(f"stream {stream}: {body.get('code')}: {body.get('message')}")
        self.stream = stream
        self.code = body.get("code")
        self.body = body


@dataclass
class Result:
    """One stream: its TOKEN pieces with their arrival times, then its DONE or ERROR."""

    stream: int
    pieces: list[str] = field(default_factory=list)
    piece_times: list[float] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)   # LOGPROBS entries
    t_start: float | None = None        # GENERATE sent (``request``)
    t_end: float | None = None          # DONE/ERROR arrived, or the connection ended
    cut: bool = False                   # ended by the connection's end, not by its own frame

    @property
    def text(self) -> str:
        """The output so far (joined when asked: no copy of it per token)."""
        return "".join(self.pieces)

    @property
    def ended(self) -> bool:
        return self.done is not None or self.error is not None

    def _add(self, f: Frame, t: float) -> None:
        if f.type is FrameType.TOKEN:
            piece = f.payload.decode("utf-8")    # strict: the server never splits a code point
            self.pieces.append(piece)
            self.piece_times.append(t)
        elif f.type is FrameType.LOGPROBS:
            self.logprobs.extend(p.parse_json(f.payload).get("content", []))
        elif f.type is FrameType.DONE:
            self.done, self.t_end = p.parse_json(f.payload), t
        elif f.type is FrameType.ERROR:
            self.error, self.t_end = p.parse_json(f.payload), t


class _FeedReader(asyncio.StreamReader):
    """The StreamReader ``Connection.open`` gives asyncio's protocol: what arrives goes
    straight to the connection (``on_data``), nothing is buffered here."""

    def __init__(self) -> None:
        super().__init__(limit=1 << 16)
        self.on_data: Any = None
        self.on_end: Any = None

    def feed_data(self, data: bytes) -> None:
        self.on_data(data)

    def feed_eof(self) -> None:
        self.on_end(None)

    def set_exception(self, exc: BaseException) -> None:
        self.on_end(exc)


class Connection:
    """One connection to the gateway's TCP front; many streams may be open on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int = MAX_FRAME) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(max_frame, allowed=p.SERVER_TYPES)
        self.welcome: dict[str, Any] = {}
        self.closed = False
        self.close_error: dict[str, Any] | None = None    # a stream-0 ERROR, if one came
        self.why: tuple[str, str] = ("connection_closed", "the connection is closed")
        self.stray_endings = 0
        self._inbox: deque[tuple[Frame, float]] = deque()  # frames nobody waits for
        self._wakeup = asyncio.Event()
        self._streams: dict[int, tuple[Result, asyncio.Future[None]]] = {}
        self._ended: dict[int, None] = {}   # streams whose end was collected (an ordered set)
        self._pongs: deque[asyncio.Future[None]] = deque()
        self._next = 0
        self.last_rx = now()
        self._task: asyncio.Task[None] | None = None
        if isinstance(reader, _FeedReader):
            reader.on_data, reader.on_end = self._on_data, self._on_end
        else:
            self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, host: str, port: int, token: str | None = None, *, hello: bool = True,
                   timeout: float | None = 10.0, client: str = NAME,
                   max_frame: int = MAX_FRAME) -> "Connection":
        """Connect (and, with ``hello``, do the handshake), each within ``timeout``."""
        loop = asyncio.get_running_loop()
        reader = _FeedReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: protocol, host, port), timeout)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(reader, writer, max_frame)
        if hello:
            try:
                await asyncio.wait_for(conn.hello(token, client), timeout)
            except BaseException:
                await conn.close()
                raise
        return conn

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- sending ----------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        """Raw bytes, frames or not (tests send malformed ones on purpose)."""
        self.writer.write(data)
        await self.writer.drain()

    async def hello(self, token: str | None = None, client: str = NAME) -> dict[str, Any]:
        """HELLO, then the WELCOME (returned); ``ServerError`` when refused."""
        await self.send(p.hello(client, token))
        f, _ = await self._next_frame()
        if f.type is FrameType.ERROR:
            raise ServerError(0, p.parse_json(f.payload))
        if f.type is not FrameType.WELCOME:
            raise ConnectionError(f"expected WELCOME, got {f.type.name}")
        self.welcome = p.parse_json(f.payload)
        return self.welcome

    async def generate(self, stream: int, /, **fields: Any) -> float:
        """Send a GENERATE (None fields left out); returns when it was sent."""
        self._ended.pop(stream, None)
        t = now()
        await self.send(p.generate(stream, **fields))
        return t

    async def cancel(self, stream: int) -> None:
        await self.send(p.cancel(stream))

    async def ping(self, payload: bytes = b"") -> float:
        """A PING's round trip, in seconds."""
        fut = asyncio.get_running_loop().create_future()
        self._pongs.append(fut)
        t = now()
        try:
            await self.send(p.ping(payload))
            await fut
        finally:
            if fut in self._pongs:
                self._pongs.remove(fut)
        return now() - t

    def free_stream(self) -> int:
        """A stream id that is not open on this connection."""
        while True:
            self._next = self._next % p.MAX_STREAM + 1
            if self._next not in self._streams:
                return self._next

    # ---- receiving --------------------------------------------------------------------
    async def recv_frame(self) -> Frame:
        """The next frame nobody else waits for; ConnectionError once the server closed."""
        return (await self._next_frame())[0]

    async def request(self, stream: int | None = None, /, **fields: Any) -> Result:
        """GENERATE on ``stream`` (default: a free one) and collect it to its end.

        Never raises for what the server or the connection did: an ERROR is
        ``result.error``; a connection that ended first is ``result.cut`` with the error
        ``connection_closed``, ``connection_error`` or the code of a stream-0 ERROR."""
        sid = self.free_stream() if stream is None else stream
        res = Result(sid, t_start=now())
        fut = self._watch(res)       # before the GENERATE goes out: no frame can pass it
        self._ended.pop(sid, None)
        try:
            if not self.closed:
                await self.send(p.generate(sid, **fields))
            await fut
        except OSError as exc:
            if not res.ended:
                res.cut, res.t_end = True, now()
                res.error = {"code": "connection_error", "message": str(exc)}
        finally:
            self._unwatch(res)
        return res

    async def collect(self, streams: Iterable[int],
                      idle_timeout: float | None = None) -> dict[int, Result]:
        """Collect streams already sent (``generate``) to their ends, frames that came
        before included; TimeoutError when no frame came for ``idle_timeout`` seconds."""
        results = {s: Result(s) for s in streams}
        left: deque[tuple[Frame, float]] = deque()
        for f, t in self._inbox:
            r = results.get(f.stream) if f.stream else None
            if r is not None and not r.ended:
                r._add(f, t)
                if r.ended:
                    self._mark_ended(r.stream)
            else:
                left.append((f, t))
        self._inbox = left
        waiting = {self._watch(r): r for r in results.values() if not r.ended}
        t0 = now()
        try:
            while waiting:
                silent = now() - max(t0, self.last_rx)
                wait = None if idle_timeout is None else max(0.0, idle_timeout - silent)
                done, _ = await asyncio.wait(waiting, timeout=wait)
                if not done and idle_timeout is not None and \
                        now() - max(t0, self.last_rx) >= idle_timeout:
                    raise TimeoutError(f"no frame for {idle_timeout:g}s")
                for fut in done:
                    waiting.pop(fut)
        finally:
            for r in results.values():
                self._unwatch(r)
        return results

    def _watch(self, res: Result) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        if self.closed:
            self._cut(res, fut)
        else:
            self._streams[res.stream] = (res, fut)
        return fut

    def _unwatch(self, res: Result) -> None:
        if self._streams.get(res.stream, (None,))[0] is res:
            del self._streams[res.stream]

    def _cut(self, res: Result, fut: asyncio.Future[None]) -> None:
        code, msg = self.why
        res.cut, res.t_end, res.error = True, now(), {"code": code, "message": msg}
        if not fut.done():
            fut.set_result(None)

    async def _next_frame(self) -> tuple[Frame, float]:
        while not self._inbox:
            if self.closed:
                raise ConnectionError(f"the server closed the connection ({self.why[1]})")
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._inbox.popleft()

    def _on_data(self, data: bytes) -> None:
        if self.closed:
            return
        t = self.last_rx = now()
        try:
            for f in self.decoder.feed(data):
                self._dispatch(f, t)
        except (LlmctlError, ValueError) as exc:     # ValueError: a split code point
            self._closed(("connection_error", f"{type(exc).__name__}: {exc}"))

    def _on_end(self, exc: BaseException | None) -> None:
        if not self.closed:
            self._closed(("connection_closed", "the server closed the connection")
                         if exc is None else ("connection_error", f"{type(exc).__name__}: {exc}"))

    async def _read_loop(self) -> None:
        why = ("connection_closed", "the server closed the connection")
        try:
            while data := await self.reader.read(65536):
                t = self.last_rx = now()
                for f in self.decoder.feed(data):
                    self._dispatch(f, t)
        except (OSError, LlmctlError, ValueError) as exc:   # ValueError: a split code point
            why = ("connection_error", f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            why = ("connection_closed", "the connection was closed by this client")
            raise
        finally:
            self._closed(why)

    def _dispatch(self, f: Frame, t: float) -> None:
        if f.stream == 0:
            if f.type is FrameType.PONG and self._pongs:
                fut = self._pongs.popleft()
                if not fut.done():
                    fut.set_result(None)
                return
            if f.type is FrameType.ERROR:
                self.close_error = p.parse_json(f.payload)
        else:
            watched = self._streams.get(f.stream)
            if watched is not None:
                res, fut = watched
                res._add(f, t)
                if res.ended:
                    del self._streams[f.stream]
                    self._mark_ended(f.stream)
                    fut.set_result(None)
                return
            if f.type in (FrameType.DONE, FrameType.ERROR) and f.stream in self._ended:
                self.stray_endings += 1
        self._inbox.append((f, t))
        self._wakeup.set()

    def _mark_ended(self, stream: int) -> None:
        self._ended[stream] = None
        if len(self._ended) > ENDED_MEMORY:
            del self._ended[next(iter(self._ended))]

    def _closed(self, why: tuple[str, str]) -> None:
        self.closed = True
        if self.close_error is not None:
            why = (str(self.close_error.get("code") or "connection_error"),
                   str(self.close_error.get("message")))
        self.why = why
        for res, fut in list(self._streams.values()):
            self._cut(res, fut)
        self._streams.clear()
        while self._pongs:
            fut = self._pongs.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError(why[1]))
        self._wakeup.set()
        self.writer.close()

    async def close(self) -> None:
        if self._task is not None:
            if not self._task.done():
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        elif not self.closed:
            self._closed(("connection_closed", "the connection was closed by this client"))
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
