"""The CC50 front: the framing of the seed ``waqasm86/cuda-tcp-llama.cpp`` on the binary
protocol's port, an adapter on the stream core (docs/protocol.md, "CC50").

A connection whose first bytes are the CC50 magic (``main.serve_binary``) speaks this framing
to its end.  Each ``REQ_INFER`` is a prompt (a text completion) with ``max_tokens`` (0: the
server's default) and ``credit_bytes`` (0: 256 KiB): its text goes out as ``RESP_CHUNK``s,
each a whole UTF-8 piece, until the stream ends (``RESP_DONE``: the tokens that went out,
the time since admission) or until the next chunk would pass ``credit_bytes``: then the
request is cancelled and ``RESP_DONE`` counts the tokens sent.  Several ``req_id``s may be
in flight on one connection; what goes wrong with one is its ``RESP_ERR`` (``code: message``,
exactly one ending, like DONE).  A header that is not CC50 (magic, version, a length over
``[gateway] max_frame``, a type a client does not send) is answered ``RESP_ERR`` and the
connection is closed.  CC50 carries no token: with ``[gateway] token`` set it is refused.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from llmctl.common import cc50
from llmctl.common.errors import (BadRequest, LlmctlError, ProtocolError, TooManyStreams,
                                  Unauthorized)
from llmctl.common.messages import Finished
from llmctl.common.request import MAX_OUTPUT, GenRequest
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.streams import Channel, Stream, hard_limit, limit_output
from llmctl.dataplane.tenants import BINARY

log = logging.getLogger(__name__)


def _error(err: LlmctlError) -> bytes:
    return f"{err.code.value}: {err.message}".encode("utf-8")


class Cc50Connection:
    """One CC50 client connection: the output of its requests, in CC50 messages."""

    def __init__(self, gw: Gateway, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.gw = gw
        self.cfg = gw.cfg.gateway
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, Stream] = {}          # by req_id
        self.budget: dict[int, int] = {}              # text bytes each may still send
        self.sent: dict[int, int] = {}                # pieces sent
        limit_output(writer.transport, self.cfg.write_buffer_bytes)
        self.channel = Channel(gw, writer.transport, writer.drain,   # type: ignore[arg-type]
                               hard_limit(self.cfg.write_buffer_bytes))

    # ---- output (the streams' Output) ----------------------------------------------------
    def token(self, s: Stream, text: str) -> bytes | None:
        data = text.encode("utf-8")
        left = self.budget.get(s.tag, 0)
        if len(data) > left:                 # credit_bytes spent: the request ends here
            if left >= 0:
                self.budget[s.tag] = -1
                asyncio.get_running_loop().call_soon(self.gw.close, s)
            return None
        self.budget[s.tag] = left - len(data)
        self.sent[s.tag] = self.sent.get(s.tag, 0) + 1
        return cc50.encode(cc50.MsgType.RESP_CHUNK, s.tag, data)

    def logprobs(self, s: Stream, content: list[dict[str, Any]]) -> None:
        return None

    def done(self, s: Stream, fin: Finished) -> bytes:
        cut = self.budget.get(s.tag, 0) < 0
        sent = self.sent.get(s.tag, 0)
        self._forget(s.tag)
        tokens = sent if cut or fin.finish_reason == "cancelled" else fin.completion_tokens
        return cc50.done(s.tag, tokens, int(fin.total_ms * 1000))

    def error(self, s: Stream, err: LlmctlError) -> bytes:
        self._forget(s.tag)
        return cc50.encode(cc50.MsgType.RESP_ERR, s.tag, _error(err))

    def _forget(self, req_id: int) -> None:
        self.streams.pop(req_id, None)
        self.budget.pop(req_id, None)
        self.sent.pop(req_id, None)

    def _send(self, data: bytes) -> None:
        self.channel.write(data)
        self.channel.flush()

    # ---- input ------------------------------------------------------------------------
    async def run(self, first: bytes) -> None:
        self.gw.counters.connections += 1
        req_id = 0
        try:
            head = first + await self.reader.readexactly(cc50.HEADER.size - len(first))
            while True:
                req_id = int.from_bytes(head[8:16], "little")
                try:
                    mtype, req_id, length = cc50.decode_header(head, self.cfg.max_frame)
                except cc50.Cc50Error as exc:
                    raise ProtocolError(str(exc)) from None
                if mtype != cc50.MsgType.REQ_INFER:
                    raise ProtocolError(f"message type {mtype} is not a request (REQ_INFER = 1)")
                if self.gw.tenancy.keyed(BINARY):
                    raise Unauthorized("this server requires a token, which CC50 cannot "
                                       "carry: use the binary protocol or the HTTP API")
                self._infer(req_id, await self.reader.readexactly(length))
                head = await self.reader.readexactly(cc50.HEADER.size)
        except LlmctlError as err:             # the connection's: answer, then close
            self.gw.note_error(err)
            self._send(cc50.encode(cc50.MsgType.RESP_ERR, req_id, _error(err)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for s in list(self.streams.values()):
                self.gw.close(s)
            self.gw.counters.connections -= 1
            await self._close()

    async def _close(self) -> None:
        try:
            if not self.writer.is_closing():
                await asyncio.wait_for(self.writer.drain(), 1.0)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        self.writer.close()

    def _infer(self, req_id: int, payload: bytes) -> None:
        try:
            if req_id in self.streams:
                raise BadRequest(f"request {req_id} is already in flight on this connection")
            if len(self.streams) >= self.cfg.max_streams:
                raise TooManyStreams(f"at most {self.cfg.max_streams} requests in flight "
                                     "per connection")
            if len(payload) < cc50.INFER.size:
                raise BadRequest(f"REQ_INFER needs {cc50.INFER.size} bytes of header, "
                                 f"got {len(payload)}")
            max_tokens, credit, n = cc50.INFER.unpack_from(payload)
            if n != len(payload) - cc50.INFER.size:
                raise BadRequest(f"prompt_len {n} does not match the payload's "
                                 f"{len(payload) - cc50.INFER.size} prompt bytes")
            try:
                prompt = payload[cc50.INFER.size:].decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest("the prompt is not UTF-8 text") from None
            if not prompt:
                raise BadRequest("the prompt is empty")
            gen = self.gw.generation
            request = GenRequest(prompt=prompt,
                                 max_tokens=min(max_tokens or gen.max_tokens, MAX_OUTPUT),
                                 temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                                 deadline_ms=gen.deadline_ms)
        except LlmctlError as err:
            self.gw.note_error(err)
            self._send(cc50.encode(cc50.MsgType.RESP_ERR, req_id, _error(err)))
            return
        self.budget[req_id] = credit or cc50.DEFAULT_CREDIT_BYTES
        try:
            self.streams[req_id] = self.gw.open(request, self, self.channel, tag=req_id)
        except LlmctlError as err:            # not ready, overloaded, shutting down: counted
            self._forget(req_id)
            self._send(cc50.encode(cc50.MsgType.RESP_ERR, req_id, _error(err)))
