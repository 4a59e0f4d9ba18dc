"""What tools/bench.py sends requests to: llmctl's wire protocol, the seed's CC50 framing, or an
OpenAI-compatible HTTP API (``bare:`` targets are in tools/bare_llama.py; ``bench.make_target``
picks one for a URL).

A target turns one request spec (``{"prompt": ...}`` or ``{"messages": [...]}`` plus
``max_tokens``, ``temperature``...) into a ``RequestRecord``, timestamping every piece of output
as it arrives. Failures are recorded (``record.error``), never raised.

- ``tcp://HOST:PORT``: the project's client of PROTOCOL v1 (``common.client.Connection``);
  one connection per in-flight request (a closed-loop client = a connection), reused.
- ``cc50://HOST:PORT``: the CC50 framing (``common.cc50.Client``), a prompt and max_tokens.
- ``http://HOST:PORT/v1``: ``POST /v1/completions`` (``/v1/chat/completions`` for messages)
  with ``"stream": true``; SSE ``data:`` lines until ``data: [DONE]``. HTTP 429 is ``overloaded``.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

from llmctl.common.client import Connection, Result, ServerError, now
from llmctl.tools.bench_stats import OVERLOADED, RequestRecord

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


# ---- llmctl's wire protocol --------------------------------------------------------------

def record_of(index: int, res: Result, stamped: bool = False) -> RequestRecord:
    """The bench's record of one stream the wire client collected."""
    rec = RequestRecord(index=index, t_start=res.t_start if res.t_start is not None else now(),
                        t_end=res.t_end, piece_times=list(res.piece_times))
    if stamped:
        rec.stamped = res.pieces
    if res.done is not None:
        rec.completion_tokens = res.done.get("completion_tokens")
        rec.prompt_tokens = res.done.get("prompt_tokens")
        rec.finish_reason = res.done.get("finish_reason")
    elif res.error is not None:
        rec.error = res.error.get("code") or "error"
        rec.message = res.error.get("message")
        rec.retry_after_ms = res.error.get("retry_after_ms")
    return rec


class TcpTarget(Target):
    """``common.client.Connection``s, one per request in flight, reused when idle."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0,
                 stamped: bool = False) -> None:
        u = urlsplit(url)
        self.stamped = stamped
        if not u.hostname or not u.port:
            raise ValueError(f"tcp target needs a host and a port: {url!r}")
        self.url, self.host, self.port, self.token = url, u.hostname, u.port, token
        self.timeout = timeout
        self.idle: list[Connection] = []
        self.all: set[Connection] = set()
        self.stray_endings = 0     # of connections already closed
        self.info: dict[str, Any] = {"protocol": "llmctl/1"}

    async def _acquire(self) -> Connection:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                return c
            self._forget(c)
        c = await Connection.open(self.host, self.port, self.token, timeout=CONNECT_TIMEOUT,
                                  client="llmctl-bench/1.0")
        self.all.add(c)
        if "server" not in self.info:
            self.info.update({k: c.welcome.get(k) for k in ("server", "model", "max_streams")})
        return c

    async def open(self) -> None:
        self.idle.append(await self._acquire())   # fail early, and learn the server and model

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        try:
            conn = await self._acquire()
        except (OSError, asyncio.TimeoutError, ServerError) as exc:
            t = now()
            return RequestRecord(index, t, t, error="connect_failed", message=str(exc))
        try:
            res = await asyncio.wait_for(conn.request(**spec), self.timeout)
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
        return record_of(index, res, self.stamped)

    def doubles(self) -> int:
        """Endings (DONE/ERROR) received for streams that had already ended."""
        return self.stray_endings + sum(c.stray_endings for c in self.all)

    def _forget(self, conn: Connection) -> None:
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
                 api_key: str | None = None, stamped: bool = False) -> None:
        self.url = url.rstrip("/")
        self.stamped = stamped
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
        if self.model is not None and "model" not in body:   # a prompts file's model wins
            body["model"] = self.model
        return ("/chat/completions" if "messages" in body else "/completions"), body

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        import aiohttp
        path, body = self.body(spec)
        rec = RequestRecord(index=index, t_start=now(), stamped=[] if self.stamped else None)
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

    async def _read_sse(self, resp: Any, rec: RequestRecord) -> None:
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
            if text := sse_text(obj):
                rec.piece_times.append(t)
                if rec.stamped is not None:
                    rec.stamped.append(text)
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


# ---- the seed's CC50 framing ---------------------------------------------------------------

class Cc50Target(Target):
    """``cc50://HOST:PORT``: ``common.cc50.Client``s, one per request in flight, reused.
    CC50 carries a prompt and max_tokens only: a chat spec's messages are sent as their
    contents, one a line, and the server's sampling defaults apply."""

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        u = urlsplit(url)
        if not u.hostname or not u.port:
            raise ValueError(f"cc50 target needs a host and a port: {url!r}")
        self.url, self.host, self.port, self.timeout = url, u.hostname, u.port, timeout
        self.idle: list[Any] = []
        self.all: list[Any] = []
        self.info: dict[str, Any] = {"protocol": "cc50/1"}

    async def _acquire(self) -> Any:
        from llmctl.common.cc50 import Client

        while self.idle:
            c = self.idle.pop()
            if not c.closed.is_set():
                return c
        c = await asyncio.wait_for(Client(self.host, self.port).connect(), CONNECT_TIMEOUT)
        self.all.append(c)
        return c

    async def open(self) -> None:
        self.idle.append(await self._acquire())

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        prompt = spec.get("prompt") or "\n".join(m["content"] for m in spec["messages"])
        t0 = now()
        try:
            conn = await self._acquire()
        except (OSError, asyncio.TimeoutError) as exc:
            return RequestRecord(index, t0, now(), error="connect_failed", message=str(exc))
        t0 = now()
        _, ans = conn.submit(prompt, max_tokens=spec.get("max_tokens", 0))
        try:
            await asyncio.wait_for(ans.done.wait(), self.timeout)
        except asyncio.TimeoutError:
            await conn.close()
            return RequestRecord(index, t0, now(), error="client_timeout",
                                 message=f"no end within {self.timeout:g}s")
        rec = RequestRecord(index, t0, now(), piece_times=list(ans.chunk_times))
        if ans.error is not None:
            rec.error, _, rec.message = ans.error.partition(": ")
        else:
            rec.completion_tokens = ans.tokens
        if not conn.closed.is_set():
            self.idle.append(conn)
        return rec

    async def close(self) -> None:
        for c in self.all:
            await c.close()
