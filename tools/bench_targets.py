"""What tools/bench.py sends requests to: llmctl's wire protocol, or an OpenAI-compatible HTTP API.

A target turns one request spec (``{"prompt": ...}`` or ``{"messages": [...]}`` plus
``max_tokens``, ``temperature``...) into a ``RequestRecord``, timestamping every piece of output
as it arrives. Failures are recorded (``record.error``), never raised.

- ``tcp://HOST:PORT``: an asyncio client of PROTOCOL v1 on top of ``dataplane.protocol``;
  one connection per in-flight request (a closed-loop client = a connection), reused.
- ``http://HOST:PORT/v1``: ``POST /v1/completions`` (``/v1/chat/completions`` for messages)
  with ``"stream": true``; SSE ``data:`` lines until ``data: [DONE]``. HTTP 429 is ``overloaded``.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from llmctl.common import protocol as p
from llmctl.common.protocol import FrameDecoder, FrameType
from llmctl.tools.bench_stats import OVERLOADED, RequestRecord

now = time.perf_counter
CONNECT_TIMEOUT = 10.0


class Target:
    """Base class: ``open()``, then ``request()`` from many tasks, then ``close()``."""

    url: str
    info: dict[str, Any]

    async def open(self) -> None:
        pass

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def make_target(url: str, **options: Any) -> Target:
    scheme = urlsplit(url).scheme
    if scheme == "tcp":
        return TcpTarget(url, token=options.get("token"), timeout=options.get("timeout", 300.0))
    if scheme in ("http", "https"):
        return HttpTarget(url, model=options.get("model"), timeout=options.get("timeout", 300.0),
                          api_key=options.get("api_key"))
    if scheme == "bare":
        from llmctl.tools.bare_llama import BareLlamaTarget   # imports llama_cpp only when asked
        return BareLlamaTarget.from_url(url)
    raise ValueError(f"unsupported target {url!r}: use tcp://HOST:PORT, http://HOST:PORT/v1 "
                     "or bare:MODEL.gguf")


# ---- llmctl's wire protocol --------------------------------------------------------------

class _Stream:
    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(self, t: float, error: str | None = None, message: str | None = None) -> None:
        if self.done.done():
            return
        self.record.t_end = t
        if error is not None:
            self.record.error, self.record.message = error, message
        self.done.set_result(None)


class TcpConnection:
    """One connection; a reader task dispatches frames to open streams, timestamped on arrival."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 welcome: dict[str, Any], decoder: FrameDecoder) -> None:
        self.reader, self.writer, self.welcome, self.decoder = reader, writer, welcome, decoder
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.stray_endings = 0     # DONE/ERROR for a stream that had ended: a double answer
        self._next = 0
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, token: str | None = None) -> "TcpConnection":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(p.hello("llmctl-bench/1.0", token))
        decoder = FrameDecoder(1 << 24, allowed=p.SERVER_TYPES)
        frames: list[p.Frame] = []
        try:
            while not frames:
                data = await asyncio.wait_for(reader.read(65536), CONNECT_TIMEOUT)
                if not data:
                    raise ConnectionError("the server closed the connection during the handshake")
                frames = decoder.feed(data)
        except BaseException:
            writer.close()
            raise
        first = frames.pop(0)
        if first.type is not FrameType.WELCOME:
            writer.close()
            body = p.parse_json(first.payload) if first.payload else {}
            raise ConnectionError(f"handshake refused: {body.get('code')}: {body.get('message')}")
        if frames:  # a server never sends stream frames before GENERATE, but be exact anyway
            raise ConnectionError("unexpected frames after WELCOME")
        return cls(reader, writer, p.parse_json(first.payload), decoder)

    def _stream_id(self) -> int:
        while True:
            self._next = self._next % p.MAX_STREAM + 1
            if self._next not in self.streams:
                return self._next

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        sid = self._stream_id()
        frame = p.generate(sid, **spec)
        rec = RequestRecord(index=index, t_start=now())
        st = self.streams[sid] = _Stream(rec)
        try:
            if self.closed:
                st.finish(now(), "connection_closed", "the connection is closed")
            else:
                self.writer.write(frame)
            await st.done
        finally:
            self.streams.pop(sid, None)
        return rec

    async def _read_loop(self) -> None:
        why, msg = "connection_closed", "the server closed the connection"
        try:
            while True:
                data = await self.reader.read(65536)
                t = now()
                if not data:
                    break
                for f in self.decoder.feed(data):
                    if f.stream == 0:
                        if f.type is FrameType.ERROR:
                            body = p.parse_json(f.payload)
                            why, msg = body.get("code") or "connection_error", body.get("message")
                        continue
                    st = self.streams.get(f.stream)
                    if st is None or st.done.done():
                        if f.type in (FrameType.DONE, FrameType.ERROR):
                            self.stray_endings += 1
                        continue
                    if f.type is FrameType.TOKEN:
                        st.record.piece_times.append(t)
                    elif f.type is FrameType.DONE:
                        body = p.parse_json(f.payload)
                        r = st.record
                        r.completion_tokens = body.get("completion_tokens")
                        r.prompt_tokens = body.get("prompt_tokens")
                        r.finish_reason = body.get("finish_reason")
                        st.finish(t)
                    elif f.type is FrameType.ERROR:
                        body = p.parse_json(f.payload)
                        st.record.retry_after_ms = body.get("retry_after_ms")
                        st.finish(t, body.get("code") or "error", body.get("message"))
        except (OSError, p.ProtocolError, p.FrameTooLarge) as exc:
            why, msg = "connection_error", str(exc)
        finally:
            self.closed = True
            t = now()
            for st in list(self.streams.values()):
                st.finish(t, why, msg)
            self.writer.close()

    async def close(self) -> None:
        self.closed = True
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class TcpTarget(Target):
    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0) -> None:
        u = urlsplit(url)
        if not u.hostname or not u.port:
            raise ValueError(f"tcp target needs a host and a port: {url!r}")
        self.url, self.host, self.port, self.token = url, u.hostname, u.port, token
        self.timeout = timeout
        self.idle: list[TcpConnection] = []
        self.all: set[TcpConnection] = set()
        self.stray_endings = 0     # of connections already closed
        self.info: dict[str, Any] = {"protocol": "llmctl/1"}

    async def _acquire(self) -> TcpConnection:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                return c
            self._forget(c)
        c = await TcpConnection.connect(self.host, self.port, self.token)
        self.all.add(c)
        if "server" not in self.info:
            self.info.update({k: c.welcome.get(k) for k in ("server", "model", "max_streams")})
        return c

    async def open(self) -> None:
        self.idle.append(await self._acquire())   # fail early, and learn the server and model

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        try:
            conn = await self._acquire()
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            t = now()
            return RequestRecord(index, t, t, error="connect_failed", message=str(exc))
        try:
            rec = await asyncio.wait_for(conn.request(index, spec), self.timeout)
        except asyncio.TimeoutError:
            t = now()
            await conn.close()
            self._forget(conn)
            return RequestRecord(index, t - self.timeout, t, error="client_timeout",
                                 message=f"no end within {self.timeout:g}s")
        if conn.closed:
            self._forget(conn)
        else:
            self.idle.append(conn)
        return rec

    def doubles(self) -> int:
        """Endings (DONE/ERROR) received for streams that had already ended."""
        return self.stray_endings + sum(c.stray_endings for c in self.all)

    def _forget(self, conn: TcpConnection) -> None:
        if conn in self.all:
            self.all.discard(conn)
            self.stray_endings += conn.stray_endings

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.all), return_exceptions=True)
        for c in list(self.all):
            self._forget(c)
        self.idle.clear()


# ---- OpenAI-compatible HTTP ----------------------------------------------------------------

def sse_text(obj: dict[str, Any]) -> str:
    """The text an OpenAI streaming chunk carries (completions or chat completions)."""
    out = []
    for ch in obj.get("choices") or ():
        text = ch.get("text")
        if text is None:
            text = (ch.get("delta") or {}).get("content")
        if text:
            out.append(text)
    return "".join(out)


class HttpTarget(Target):
    def __init__(self, url: str, model: str | None = None, timeout: float = 300.0,
                 api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.info: dict[str, Any] = {"protocol": "openai-http"}
        self.session: Any = None

    async def open(self) -> None:
        import aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),  # no stale keep-alive races
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT,
                                          sock_read=self.timeout),
            headers=self.headers)
        if self.model is None:   # servers that need a model name: the first one they list
            try:
                async with self.session.get(self.url + "/models") as resp:
                    body = await resp.json(content_type=None)
                    self.model = body["data"][0]["id"]
                    self.info["server"] = resp.headers.get("Server")
            except Exception:    # noqa: BLE001 - optional: llama-server ignores the name anyway
                self.model = None
        self.info["model"] = self.model

    def body(self, spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        body = {k: v for k, v in spec.items() if v is not None}
        body.update(stream=True, stream_options={"include_usage": True})
        if self.model is not None:
            body["model"] = self.model
        return ("/chat/completions" if "messages" in body else "/completions"), body

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        import aiohttp
        path, body = self.body(spec)
        rec = RequestRecord(index=index, t_start=now())
        try:
            async with self.session.post(self.url + path, json=body) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:500]
                    rec.t_end = now()
                    rec.error = OVERLOADED if resp.status == 429 else f"http_{resp.status}"
                    rec.message = text
                    if ra := resp.headers.get("Retry-After"):
                        try:
                            rec.retry_after_ms = int(float(ra) * 1000)
                        except ValueError:
                            pass
                    return rec
                await self._read_sse(resp, rec)
        except asyncio.TimeoutError:
            rec.t_end, rec.error, rec.message = now(), "client_timeout", f"no data in {self.timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            rec.t_end, rec.error, rec.message = now(), "connect_failed", str(exc)
        except (aiohttp.ClientError, OSError) as exc:
            rec.t_end, rec.error, rec.message = now(), "connection_error", str(exc)
        return rec

    @staticmethod
    async def _read_sse(resp: Any, rec: RequestRecord) -> None:
        async for raw in resp.content:
            t = now()
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                rec.t_end = t
                return
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
                code = err.get("code") or err.get("type") or "server_error"
                rec.t_end, rec.error, rec.message = t, str(code), err.get("message")
                if code in (429, "429", "rate_limit_exceeded"):
                    rec.error = OVERLOADED
                return
            if sse_text(obj):
                rec.piece_times.append(t)
            for ch in obj.get("choices") or ():
                if ch.get("finish_reason"):
                    rec.finish_reason = ch["finish_reason"]
            usage = obj.get("usage")
            if usage:
                rec.completion_tokens = usage.get("completion_tokens", rec.completion_tokens)
                rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        rec.t_end = now()
        rec.error, rec.message = "truncated", "the stream ended without data: [DONE]"

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
