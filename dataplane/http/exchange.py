"""One generation request over HTTP, for every HTTP dialect: a stream on the core whose
answer is collected (one JSON body) or streamed (server-sent events on a chunked
response).

A dialect (``openai.py``, ...) parses its body into a ``GenRequest`` and gives a
``Dialect``: the rendering of one request's events in its shapes.  ``exchange`` opens the
stream and returns the response; credit, windows, parking, slow clients and cancellation
are the core's (``gateway.py``, ``streams.py``), as for every front:

* collected: the events are taken at once (held in memory, bounded by ``max_tokens``);
  the answer is written when the stream ends;
* streamed: the events are held until the first one came (an error before anything was
  sent is a plain error response with its status), then the response starts and its
  connection becomes the stream's ``Channel``: each round's events are one HTTP chunk,
  and token credit comes back as the client takes them.

The client going away (aiohttp cancels the handler) closes the stream.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Protocol

from aiohttp import web

from llmctl.common.errors import LlmctlError
from llmctl.common.messages import Finished
from llmctl.common.request import GenRequest
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.http.base import TENANT_KEY
from llmctl.dataplane.http.openai_shapes import dumps
from llmctl.dataplane.tenants import DEFAULT
from llmctl.dataplane.scheduler import Scheduler
from llmctl.dataplane.streams import Channel, Stream, hard_limit, limit_output

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8",
               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Dialect(Protocol):
    """One request's events in an HTTP API's shapes.  ``streaming`` says which half is
    used: ``head``/``token``/``done``/``error`` return SSE bytes; otherwise ``token``
    collects and ``answer`` is the JSON body."""
    streaming: bool

    def head(self) -> bytes: ...                                  # first events, or b""
    def token(self, text: str) -> bytes | None: ...
    def logprobs(self, content: list[dict[str, Any]]) -> None: ...   # for the next token
    def done(self, fin: Finished) -> bytes: ...                   # the last events
    def error(self, err: LlmctlError) -> bytes: ...              # after the stream began
    def answer(self, fin: Finished) -> web.StreamResponse: ...    # collected


class _Output:
    """The stream's Output: renders through the dialect once the response started, holds
    the events before that, and resolves ``ended`` with the stream's end."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.live = False                        # the response has started
        self.held: list[tuple[str, Any]] = []
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[Finished] = loop.create_future()

    def _hold(self, kind: str, value: Any) -> None:
        self.held.append((kind, value))
        if not self.first.done():
            self.first.set_result(None)

    def token(self, s: Stream, text: str) -> bytes | None:
        if self.live or not self.dialect.streaming:
            return self.dialect.token(text)
        self._hold("token", text)
        return None

    def logprobs(self, s: Stream, content: list[dict[str, Any]]) -> None:
        if self.live or not self.dialect.streaming:
            self.dialect.logprobs(content)
        else:
            self._hold("logprobs", content)

    def done(self, s: Stream, fin: Finished) -> bytes | None:
        if not self.ended.done():
            self.ended.set_result(fin)
        if self.live:
            return self.dialect.done(fin)
        self._hold("done", fin)
        return None

    def error(self, s: Stream, err: LlmctlError) -> bytes | None:
        if not self.ended.done():
            self.ended.set_exception(err)
            self.ended.exception()                   # retrieved: raised by whoever awaits
        if self.live:
            return self.dialect.error(err)
        self._hold("error", err)
        return None

    def start(self) -> tuple[bytes, bool]:
        """Go live: the bytes of the events held so far (after the dialect's head), and
        whether they carry tokens."""
        d, parts, tokens = self.dialect, [self.dialect.head()], False
        for kind, value in self.held:
            if kind == "token":
                tokens = True
                parts.append(d.token(value) or b"")
            elif kind == "logprobs":
                d.logprobs(value)
            elif kind == "done":
                parts.append(d.done(value))
            else:
                parts.append(d.error(value))
        self.held = []
        self.live = True
        return b"".join(parts), tokens


class Collected:
    """A request answered with one JSON object made of its end (``render(fin)``): a
    ``tokenize`` request's count, an embeddings answer, llama-server's utility answers."""
    streaming = False

    def __init__(self, render: Callable[[Finished], dict[str, Any]]) -> None:
        self.render = render

    def head(self) -> bytes:
        return b""

    def token(self, text: str) -> bytes | None:
        return None

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        pass

    def done(self, fin: Finished) -> bytes:
        return b""

    def error(self, err: LlmctlError) -> bytes:
        return b""

    def answer(self, fin: Finished) -> web.StreamResponse:
        return web.json_response(self.render(fin), dumps=dumps)


async def utility(gw: Gateway, request: web.Request, gen: GenRequest,
                  render: Callable[[Finished], dict[str, Any]],
                  sched: Scheduler | None = None) -> web.StreamResponse:
    """Run a utility request (``tokenize``, ...) and answer ``render`` of its end."""
    return await exchange(gw, request, gen, Collected(render), sched)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def exchange(gw: Gateway, request: web.Request, gen: GenRequest, dialect: Dialect,
                   sched: Scheduler | None = None) -> web.StreamResponse:
    """Run ``gen`` and answer it in ``dialect``'s shapes.  Raises what admission raises
    (ModelNotFound, NotReady, Overloaded, ShuttingDown) and, before a streamed response
    started, the stream's error: the caller renders those with their status."""
    out = _Output(dialect)
    s = gw.open(gen, out, sched=sched, tenant=request.get(TENANT_KEY, DEFAULT))
    try:
        if not dialect.streaming:
            return dialect.answer(await out.ended)
        await asyncio.wait({out.first, out.ended}, return_when=asyncio.FIRST_COMPLETED)
        if out.held and out.held[0][0] == "error":
            raise out.held[0][1]
        return await _stream(gw, request, s, out)
    finally:
        gw.close(s)        # the client went away, or the gateway stops: its slot comes back


async def _stream(gw: Gateway, request: web.Request, s: Stream,
                  out: _Output) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    cfg = gw.cfg.gateway
    transport = request.transport
    if transport is None:                           # the client is already gone
        return resp
    # Bound what a connection may hold, as the TCP front does: past this the writes
    # wait, the credits stay here and the worker pauses the sequence.
    limit_output(transport, cfg.write_buffer_bytes)
    await resp.prepare(request)
    writer = request.writer
    writer.send_headers()                           # the body goes straight to the socket
    channel = Channel(gw, transport, writer.drain, hard_limit(cfg.write_buffer_bytes),  # type: ignore[arg-type]
                      frame=_chunk if writer.chunked else None)
    data, tokens = out.start()
    if not s.finished:
        channel.attach(s)
    if data:
        channel.write(data, tokens=tokens)
        channel.flush()
    try:
        await out.ended
    except LlmctlError:
        pass                                        # rendered in the stream already
    if channel.closed:
        return resp
    try:
        async with asyncio.timeout(cfg.slow_client_timeout_s):
            await resp.write_eof()
    except (TimeoutError, ConnectionError):
        log.info("%s: did not take the end of its stream: closing", request.remote)
        channel.abort()
    return resp
