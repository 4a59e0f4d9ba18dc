"""The OpenAI-compatible HTTP front: aiohttp on the gateway's own event loop.

It is a second front on the one data plane: requests are validated by
``protocol.validate_generate`` (as on the TCP front), admitted by ``Gateway.submit``
(the same queue, credits and deadlines), cancelled by ``Gateway.cancel`` when the
client goes away, and their token credit is given back (``Gateway.grant``) only once
a token has been written and the connection's write buffer has drained, so a slow
HTTP reader pauses its sequence on the worker exactly like a slow TCP one.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``.  ``build_app(gw)`` returns the
application, so more routes (``/metrics``) can be added before it is served.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with
the status of ``errors.http_status``; an error after a stream began is one SSE
``data: {"error": ...}`` event, then ``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import math
import os
from typing import Any

from aiohttp import web

from llmctl.common.errors import (BadRequest, BodyTimeout, Code, FrameTooLarge, InternalError,
                                  LlmctlError, ModelNotFound, NotReady, ShuttingDown,
                                  Unauthorized, openai_type)
from llmctl.common.protocol import Defaults, GenerateRequest, parse_json, validate_generate
from llmctl.dataplane import embeddings as emb
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.scheduler import Request
from llmctl.dataplane.shapes import Reply, dumps
from llmctl.dataplane.tools import ToolMode, parse_call, render_messages, tool_mode
from llmctl.dataplane.transport import limit_output

log = logging.getLogger(__name__)

API_KEY_ENV = "LLMCTL_API_KEY"
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
SHUTDOWN_TIMEOUT_S = 1.0    # open responses get this long when the gateway stops
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE_EVENT = b"data: [DONE]\n\n"
# OpenAI fields whose other values would change the answer's shape: refused, not ignored.
_ONLY = {"n": 1, "best_of": 1, "echo": False, "suffix": ""}
# Fields that would change the answer and that llmctl does not implement: refused unless
# absent or at their no-op value (0, empty, null).
_UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "audio", "prediction",
                "web_search_options", "reasoning_effort", "min_p", "repeat_penalty",
                "typical_p", "mirostat")
_TEXT_ONLY = (None, ["text"])         # modalities


def api_key(cfg_key: str) -> str:
    """The required Bearer key: ``$LLMCTL_API_KEY`` if set and non-empty, else the config's."""
    return os.environ.get(API_KEY_ENV) or cfg_key


_dumps = dumps     # compact UTF-8 JSON, as the response shapes are written


def _bad(message: str, param: str | None) -> BadRequest:
    err = BadRequest(message)
    err.param = param  # type: ignore[attr-defined]
    return err


def error_body(err: LlmctlError) -> dict[str, Any]:
    param = getattr(err, "param", None)
    if isinstance(err, ModelNotFound):
        param = "model"
    return {"error": {"message": err.message, "type": openai_type(err.code),
                      "param": param, "code": err.openai_code or err.code.value}}


def error_response(err: LlmctlError) -> web.Response:
    headers = {}
    if err.code is Code.OVERLOADED:
        ms = err.retry_after_ms if err.retry_after_ms is not None else 250
        headers["Retry-After"] = str(max(1, math.ceil(ms / 1000)))
    elif err.code is Code.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(error_body(err), status=err.http_status, headers=headers,
                             dumps=_dumps)


# ---- request -> GenerateRequest ---------------------------------------------------------

def _text_content(content: Any, i: int) -> Any:
    """A message's content: a string, or a list of text parts (joined by newlines)."""
    if not isinstance(content, list):
        return content     # validate_generate checks it is a string
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" \
                or not isinstance(part.get("text"), str):
            raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
        texts.append(part["text"])
    return "\n".join(texts)


def to_generate(body: dict[str, Any], defaults: Defaults,
                chat: bool) -> tuple[GenerateRequest, bool, bool, ToolMode | None]:
    """(the GenerateRequest, stream?, include_usage?, tool calling) of an OpenAI request body."""
    for key, only in _ONLY.items():
        v = body.get(key)
        if v is not None and (v != only or type(v) is not type(only)):
            raise _bad(f"{key} is not supported: only {_dumps(only)}", key)
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, 0, {}, []):
            raise _bad(f"{key} is not supported", key)
    if body.get("modalities") not in _TEXT_ONLY:
        raise _bad('modalities other than ["text"] is not supported', "modalities")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options must be an object", "stream_options")
    include_usage = (opts or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage must be a boolean", "stream_options")
    # Server defaults ([generation]) apply to what is left out, as on the TCP front;
    # top_k and deadline_ms are extensions to OpenAI's fields.
    obj = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop",
                                    "deadline_ms", "response_format", "grammar", "model")}
    if obj["model"] is not None and not isinstance(obj["model"], str):
        raise _bad("model must be a string", "model")
    mode = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages must be a non-empty list", "messages")
        mode = tool_mode(body)
        if mode is not None:
            rf = body.get("response_format")
            if body.get("grammar") is not None or (isinstance(rf, dict)
                                                   and rf.get("type") != "text"):
                raise _bad("tools cannot be combined with grammar or a JSON response_format "
                           "(tool_choice \"none\" can)", "tools")
            if body.get("logprobs"):
                raise _bad("logprobs with tools is not supported", "logprobs")
        messages = render_messages(messages, mode)
        obj["messages"] = [{**m, "content": _text_content(m.get("content"), i)}
                           if isinstance(m, dict) else m for i, m in enumerate(messages)]
        obj["logprobs"], obj["top_logprobs"] = body.get("logprobs"), body.get("top_logprobs")
        mct = body.get("max_completion_tokens")
        obj["max_tokens"] = _n_predict(body, mct if mct is not None else body.get("max_tokens"))
    else:
        for key in ("tools", "tool_choice"):
            if body.get(key) is not None:
                raise _bad(f"{key} is for /v1/chat/completions", key)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad("prompt must be a string (or a list of one string)", "prompt")
        obj["prompt"] = prompt
        obj["max_tokens"] = _n_predict(body, body.get("max_tokens"))
        # the legacy API's logprobs is the number of alternatives (0..20 here, 5 at OpenAI)
        n = body.get("logprobs")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise _bad("logprobs must be an integer (alternatives per token)", "logprobs")
            obj["logprobs"], obj["top_logprobs"] = True, n
    params = validate_generate(obj, defaults)
    if mode is not None:
        params = dataclasses.replace(params, json_schema=mode.schema, or_text=mode.or_text)
    return params, bool(stream), bool(include_usage), mode


def _n_predict(body: dict[str, Any], otherwise: Any) -> Any:
    """The output limit: llama-server's ``n_predict`` when given (it wins over OpenAI's
    names there too; -1 = until the context is full), else ``otherwise``."""
    n = body.get("n_predict")
    if n is None:
        return otherwise
    if isinstance(n, bool) or not isinstance(n, int) or n == 0 or n < -1:
        raise _bad("n_predict must be a positive integer, or -1 for no limit", "n_predict")
    return 1 << 20 if n == -1 else n


def _event(obj: dict[str, Any]) -> bytes:
    """One SSE event."""
    return f"data: {_dumps(obj)}\n\n".encode("utf-8")


# ---- the sink ---------------------------------------------------------------------------

class HttpSink:
    """A request's output, held for its handler in arrival order: tokens (bounded by the
    worker's token window: those not yet written hold their credit), logprobs, its end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.ready = asyncio.Event()

    def on_token(self, req: Request, text: str) -> None:
        self.events.append(("token", text))
        self.ready.set()

    def on_logprobs(self, req: Request, content: list[dict[str, Any]]) -> None:
        self.events.append(("logprobs", content))
        self.ready.set()

    def on_done(self, req: Request, stats: dict[str, Any]) -> None:
        self.events.append(("done", stats))
        self.ready.set()

    def on_error(self, req: Request, err: LlmctlError) -> None:
        self.events.append(("error", err))
        self.ready.set()

    async def next(self) -> list[tuple[str, Any]]:
        """Every event since the last call, in order (waits while there is none): the
        handler writes the tokens that came together at once."""
        while not self.events:
            self.ready.clear()
            await self.ready.wait()
        events, self.events = self.events, []
        return events


class _ClientGone(Exception):
    pass


class _Exchange:
    """One generation request on its way from submit to the client."""

    def __init__(self, gw: Gateway, request: web.Request, chat: bool,
                 tools: ToolMode | None = None) -> None:
        self.gw = gw
        self.tools = tools
        self.request = request
        self.reply = Reply(chat, gw.model_name)
        self.sink = HttpSink()
        self.req: Request | None = None

    async def run(self, params: GenerateRequest, stream: bool,
                  include_usage: bool) -> web.StreamResponse:
        # The model named in the body (ModelNotFound: 404); with one [model] any name
        # is that model, as before [[models]] existed.
        sched = self.gw.route(params.model, lenient=True)
        self.reply.model = sched.model
        # NotReady / Overloaded / ShuttingDown
        self.req = self.gw.submit(params, self.sink, sched=sched)
        try:
            if stream:
                return await self._stream(include_usage)
            return await self._collect()
        finally:
            # The client went away (the handler is cancelled, or a write failed) or
            # the gateway stops: the request gives its slot back.
            self.gw.cancel(self.req)

    async def _collect(self) -> web.Response:
        assert self.req is not None
        parts: list[str] = []
        lps: list[dict[str, Any]] | None = [] if self.req.params.logprobs else None
        while True:
            events = await self.sink.next()
            self.gw.grant(self.req, sum(kind == "token" for kind, _ in events))   # held in
            for kind, val in events:                                   # memory: max_tokens
                if kind == "token":
                    parts.append(val)
                elif kind == "logprobs":
                    if lps is not None:
                        lps.extend(val)
                elif kind == "done":
                    call = parse_call("".join(parts), self.tools) if self.tools else None
                    out = self.reply.tool_full(call, val) if call is not None \
                        else self.reply.full("".join(parts), val, lps)
                    return web.json_response(out, dumps=_dumps)
                else:
                    raise val

    async def _stream(self, include_usage: bool) -> web.StreamResponse:
        assert self.req is not None
        resp: web.StreamResponse | None = None
        want_lp = self.req.params.logprobs
        held: list[dict[str, Any]] = []     # logprobs of the tokens behind the next piece
        offset = 0                          # characters sent (completions' text_offset)
        # A tool call is held until it is whole, then sent in one chunk; with "auto" an
        # answer is a call if it starts with "{" (the grammar's text never does).
        calling: bool | None = None if self.tools is None or self.tools.or_text else True
        if self.tools is None:
            calling = False
        call_parts: list[str] = []
        ended = False
        try:
            while not ended:
                # The events that came together are written at once, and the credit of
                # their tokens comes back once it is written (and drained, if it had to).
                events = await self.sink.next()
                out: list[bytes] = []
                tokens = 0
                for kind, val in events:
                    if kind == "logprobs":
                        held.extend(val)
                        continue
                    if resp is None:
                        if kind == "error":
                            raise val   # nothing sent yet: a plain JSON error with its status
                        resp = await self._start()
                        if self.reply.chat:    # OpenAI's first chat chunk: the role
                            out.append(_event(self.reply.chunk("", role=True)))
                    if kind == "token":
                        tokens += 1
                        if calling is None:
                            calling = val.startswith("{")
                        if calling:
                            call_parts.append(val)     # held in memory, bounded by max_tokens
                        elif want_lp:
                            out.append(_event(self.reply.chunk(val, logprobs=held,
                                                               offset=offset)))
                            offset += len(val)
                            held = []
                        else:
                            out.append(self.reply.token_event(val))
                        continue
                    if kind == "done":
                        if calling:
                            text = "".join(call_parts)
                            call = parse_call(text, self.tools) if self.tools else None
                            if call is not None:
                                out.append(_event(self.reply.tool_chunk(call)))
                                val = {**val, "finish_reason": "tool_calls"}
                            elif text:      # cut by max_tokens: what there is, as text
                                out.append(_event(self.reply.chunk(text)))
                        if held and want_lp:    # tokens that showed no text of their own
                            out.append(_event(self.reply.chunk("", logprobs=held,
                                                               offset=offset)))
                        out.append(_event(self.reply.chunk(
                            None, finish_reason=self.reply.finish_reason(val))))
                        if include_usage:
                            out.append(_event(self.reply.usage_chunk(val)))
                    else:
                        out.append(_event(error_body(val)))
                    out.append(_DONE_EVENT)
                    ended = True
                    break
                if out:
                    assert resp is not None
                    await self._write(resp, b"".join(out))
                if tokens and not ended:
                    self.gw.grant(self.req, tokens)
            assert resp is not None
            await resp.write_eof()
        except (_ClientGone, ConnectionError):
            pass
        return resp  # type: ignore[return-value]

    async def _start(self) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        # Bound what a connection may hold, as the TCP front does: past this the
        # writes wait, the credits stay here and the worker pauses the sequence.
        transport = self.request.transport
        if transport is not None:
            limit_output(transport, self.gw.cfg.gateway.write_buffer_bytes)
        await resp.prepare(self.request)
        return resp

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        """Write, and wait while the connection's buffer holds bytes the kernel refused;
        a client that takes nothing for slow_client_timeout_s is disconnected."""
        timeout = self.gw.cfg.gateway.slow_client_timeout_s
        try:
            async with asyncio.timeout(timeout):      # no task per write (wait_for's)
                await resp.write(data)
                transport = self.request.transport
                if transport is not None and transport.get_write_buffer_size():
                    await self.request.writer.drain()  # the kernel refused some: wait
        except TimeoutError:
            log.warning("%s: took no output for %.1fs: cancelling and disconnecting",
                        self.request.remote, timeout)
            self.gw.counters.slow_clients += 1
            if self.request.transport is not None:
                self.request.transport.abort()
            raise _ClientGone() from None


# ---- handlers -----------------------------------------------------------------------------

async def _body(request: web.Request) -> dict[str, Any]:
    timeout = request.app[GATEWAY_KEY].cfg.http.body_timeout_s
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:
        raise FrameTooLarge(f"request body over {request.client_max_size} bytes") from None
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g}s") from None
    return parse_json(raw, BadRequest)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    params, stream, include_usage, tools = to_generate(await _body(request), gw.defaults, chat)
    return await _Exchange(gw, request, chat, tools).run(params, stream, include_usage)


async def embeddings(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    params, fmt = emb.to_embed(await _body(request), gw.defaults)
    sink = HttpSink()
    req = gw.submit(params, sink)       # NotReady / Overloaded / ShuttingDown
    try:
        while True:
            for kind, val in await sink.next():
                if kind == "done":
                    return web.json_response(emb.response(val, fmt, gw.model_name),
                                             dumps=_dumps)
                if kind == "error":
                    raise val
    finally:
        gw.cancel(req)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


def _model_card(gw: Gateway, name: str) -> dict[str, Any]:
    """OpenAI's model object, with llmctl's ``state`` (loaded, loading, unloading,
    unloaded: the supervisor's view, or the gateway's own before it has one)."""
    sched = gw.sched.get(name)
    ready = sched is not None and sched.ready
    state = gw.procs.get("models", {}).get(name, {}).get("state") \
        or ("loaded" if ready else "unloaded")
    return {"id": name, "object": "model", "created": int(gw.started), "owned_by": "llmctl",
            "state": state}


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    return web.json_response({"object": "list",
                              "data": [_model_card(gw, s.model) for s in gw.sched]},
                             dumps=_dumps)


async def model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = request.match_info["model"]
    if gw.sched.get(name) is None:
        raise ModelNotFound(f"the model {name!r} does not exist")
    return web.json_response(_model_card(gw, name), dumps=_dumps)


async def health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    sched = gw.sched
    err: LlmctlError | None = None
    if sched.draining:
        err = ShuttingDown("the server is draining for a stop")
    elif not sched.ready:
        err = NotReady("no worker is ready")
    if err is not None:
        return web.json_response({"status": err.code.value, "reason": err.message},
                                 status=err.http_status, dumps=_dumps)
    ready = sum(1 for w in sched.workers.values() if not w.draining)
    return web.json_response({
        "status": "ok", "model": gw.model_name, "workers_ready": ready,
        "queue": len(sched.queue), "max_queue": sched.max_queue,
        "inflight": sched.inflight_count()}, dumps=_dumps)


# ---- middleware, app, serving -------------------------------------------------------------

def bearer_matches(header: str, expected: bytes) -> bool:
    """Does an ``Authorization`` header carry ``Bearer <expected>``?  Compared in constant
    time; a header that is not text (odd bytes decode to surrogates) never matches."""
    scheme, _, token = header.partition(" ")
    try:
        given = token.strip().encode("utf-8")
    except UnicodeEncodeError:
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)


def _middleware(key: str) -> Any:
    expected = key.encode()

    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if expected and request.path.startswith("/v1/") and not bearer_matches(
                    request.headers.get("Authorization", ""), expected):
                raise Unauthorized("missing or wrong API key (Authorization: Bearer KEY)")
            return await handler(request)
        except LlmctlError as err:
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"error": {"message": exc.reason, "param": None, "code": None,
                              "type": "invalid_request_error" if exc.status < 500
                              else "server_error"}}
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return web.json_response(body, status=exc.status, headers=headers, dumps=_dumps)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(InternalError("internal error"))

    return errors_and_auth


def build_app(gw: Gateway) -> web.Application:
    """The OpenAI-compatible application; add routes (e.g. /metrics) before serving it.
    Routes under /v1/ need the API key when one is set; others do not."""
    app = web.Application(middlewares=[_middleware(api_key(gw.cfg.http.api_key))],
                          client_max_size=gw.cfg.gateway.max_frame)
    app[GATEWAY_KEY] = gw
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    return app


async def serve_http(gw: Gateway, app: web.Application | None = None) -> web.AppRunner:
    """Listen on [http] host:port; the caller stops it with ``await runner.cleanup()``."""
    cfg = gw.cfg.http
    # handler_cancellation: a client that disconnects cancels its handler, whose
    # ``finally`` cancels the request (streaming or not).
    runner = web.AppRunner(app if app is not None else build_app(gw),
                           handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    if cfg.enabled:
        log.info("OpenAI-compatible HTTP API listening on %s%s",
                 ", ".join(f"{a[0]}:{a[1]}" for a in runner.addresses),
                 " (API key required)" if api_key(cfg.api_key) else "")
    return runner
