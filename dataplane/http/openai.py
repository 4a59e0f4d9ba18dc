"""OpenAI's API: ``POST /v1/chat/completions`` and ``/v1/completions``, parsed into the
one request type and rendered back in OpenAI's shapes (``openai_shapes.py``), streamed
or not (``exchange.py``).

Fields that would change the answer and are not implemented are refused with a 400
naming them (``_UNSUPPORTED``, ``_ONLY``), never ignored.  llama-server's ``n_predict``
is read beside ``max_tokens`` (it wins, as there).
"""
from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from llmctl.common.errors import BadRequest, LlmctlError
from llmctl.common.messages import Finished
from llmctl.common.request import GenRequest, MAX_OUTPUT, validate
from llmctl.dataplane.http.exchange import exchange
from llmctl.dataplane.http.openai_shapes import Reply, dumps
from llmctl.dataplane.http.base import GATEWAY_KEY, error_body, read_body
from llmctl.dataplane.http.tool_calls import ToolMode, parse_call, render_messages, tool_mode

# OpenAI fields whose other values would change the answer's shape: refused, not ignored.
_ONLY = {"n": 1, "best_of": 1, "echo": False, "suffix": ""}
# Fields that would change the answer and that llmctl does not implement: refused unless
# absent or at their no-op value (0, empty, null).
_UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "audio", "prediction",
                "web_search_options", "reasoning_effort", "min_p", "repeat_penalty",
                "typical_p", "mirostat")
_TEXT_ONLY = (None, ["text"])         # modalities
_DONE_EVENT = b"data: [DONE]\n\n"


def _text_content(content: Any, i: int) -> Any:
    """A message's content: a string, or a list of text parts (joined by newlines)."""
    if not isinstance(content, list):
        return content     # validate checks it is a string
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" \
                or not isinstance(part.get("text"), str):
            raise BadRequest(f"messages[{i}].content: only text parts are supported",
                             param="messages")
        texts.append(part["text"])
    return "\n".join(texts)


def n_predict(body: dict[str, Any], otherwise: Any) -> Any:
    """The output limit: llama-server's ``n_predict`` when given (it wins over OpenAI's
    names there too; -1 = until the context is full), else ``otherwise``."""
    n = body.get("n_predict")
    if n is None:
        return otherwise
    if isinstance(n, bool) or not isinstance(n, int) or n == 0 or n < -1:
        raise BadRequest("n_predict must be a positive integer, or -1 for no limit",
                         param="n_predict")
    return MAX_OUTPUT if n == -1 else n


def _common(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream?, include_usage?), after refusing what is not implemented."""
    for key, only in _ONLY.items():
        v = body.get(key)
        if v is not None and (v != only or type(v) is not type(only)):
            raise BadRequest(f"{key} is not supported: only {dumps(only)}", param=key)
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, 0, {}, []):
            raise BadRequest(f"{key} is not supported", param=key)
    if body.get("modalities") not in _TEXT_ONLY:
        raise BadRequest('modalities other than ["text"] is not supported', param="modalities")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    include_usage = (opts or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage must be a boolean",
                         param="stream_options")
    if body.get("model") is not None and not isinstance(body.get("model"), str):
        raise BadRequest("model must be a string", param="model")
    return bool(stream), bool(include_usage)


def to_request(body: dict[str, Any], gen: Any,
               chat: bool) -> tuple[GenRequest, bool, bool, ToolMode | None]:
    """(the request, stream?, include_usage?, tool calling) of an OpenAI request body;
    the server's ``[generation]`` defaults fill in what it leaves out (``top_k``,
    ``deadline_ms`` and ``speculative`` are extensions to OpenAI's fields)."""
    stream, include_usage = _common(body)
    obj = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop",
                                    "deadline_ms", "response_format", "grammar", "model",
                                    "priority", "speculative")}
    mode = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", param="messages")
        mode = tool_mode(body)
        if mode is not None:
            rf = body.get("response_format")
            if body.get("grammar") is not None or (isinstance(rf, dict)
                                                   and rf.get("type") != "text"):
                raise BadRequest("tools cannot be combined with grammar or a JSON "
                                 "response_format (tool_choice \"none\" can)", param="tools")
            if body.get("logprobs"):
                raise BadRequest("logprobs with tools is not supported", param="logprobs")
        messages = render_messages(messages, mode)
        obj["messages"] = [{**m, "content": _text_content(m.get("content"), i)}
                           if isinstance(m, dict) else m for i, m in enumerate(messages)]
        obj["logprobs"], obj["top_logprobs"] = body.get("logprobs"), body.get("top_logprobs")
        mct = body.get("max_completion_tokens")
        obj["max_tokens"] = n_predict(body, mct if mct is not None else body.get("max_tokens"))
    else:
        for key in ("tools", "tool_choice"):
            if body.get(key) is not None:
                raise BadRequest(f"{key} is for /v1/chat/completions", param=key)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string (or a list of one string)", param="prompt")
        obj["prompt"] = prompt
        obj["max_tokens"] = n_predict(body, body.get("max_tokens"))
        # the legacy API's logprobs is the number of alternatives (0..20 here, 5 at OpenAI)
        n = body.get("logprobs")
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise BadRequest("logprobs must be an integer (alternatives per token)",
                                 param="logprobs")
            obj["logprobs"], obj["top_logprobs"] = True, n
    request = validate(obj, gen)
    if mode is not None:
        request = msgspec.structs.replace(request, json_schema=mode.schema, or_text=mode.or_text)
    return request, stream, include_usage, mode


def _event(obj: dict[str, Any]) -> bytes:
    """One SSE event."""
    return f"data: {dumps(obj)}\n\n".encode("utf-8")


class OpenAIDialect:
    """One chat or text completion's events in OpenAI's shapes (``exchange.Dialect``).
    A tool call is held until it is whole, then sent in one chunk; with ``auto`` an answer
    is a call if it starts with ``{`` (the grammar's free text never does)."""

    def __init__(self, reply: Reply, streaming: bool, include_usage: bool,
                 tools: ToolMode | None, want_logprobs: bool) -> None:
        self.reply = reply
        self.streaming = streaming
        self.include_usage = include_usage
        self.tools = tools
        self.want_lp = want_logprobs
        self.calling: bool | None = None if tools is not None and tools.or_text \
            else tools is not None
        self.parts: list[str] = []               # the text held: collected, or a tool call
        self.lps: list[dict[str, Any]] = []      # logprobs of the tokens behind the next piece
        self.all_lps: list[dict[str, Any]] = []  # collected
        self.offset = 0                          # characters sent (completions' text_offset)

    def head(self) -> bytes:
        # OpenAI's first chat chunk: the role
        return _event(self.reply.chunk("", role=True)) if self.reply.chat else b""

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        (self.lps if self.streaming else self.all_lps).extend(content)

    def token(self, text: str) -> bytes | None:
        if self.calling is None:
            self.calling = text.startswith("{")
        if not self.streaming or self.calling:
            self.parts.append(text)               # held in memory, bounded by max_tokens
            return None
        if self.want_lp:
            data = _event(self.reply.chunk(text, logprobs=self.lps, offset=self.offset))
            self.offset += len(text)
            self.lps = []
            return data
        return self.reply.token_event(text)

    def done(self, fin: Finished) -> bytes:
        out, reason = [], self.reply.finish_reason(fin)
        if self.calling:
            text = "".join(self.parts)
            call = parse_call(text, self.tools) if self.tools else None
            if call is not None:
                out.append(_event(self.reply.tool_chunk(call)))
                reason = "tool_calls"
            elif text:      # cut by max_tokens: what there is, as text
                out.append(_event(self.reply.chunk(text)))
        if self.lps and self.want_lp:     # tokens that showed no text of their own
            out.append(_event(self.reply.chunk("", logprobs=self.lps, offset=self.offset)))
        out.append(_event(self.reply.chunk(None, finish_reason=reason)))
        if self.include_usage:
            out.append(_event(self.reply.usage_chunk(fin)))
        out.append(_DONE_EVENT)
        return b"".join(out)

    def error(self, err: LlmctlError) -> bytes:
        return _event(error_body(err)) + _DONE_EVENT

    def answer(self, fin: Finished) -> web.StreamResponse:
        text = "".join(self.parts)
        call = parse_call(text, self.tools) if self.tools else None
        out = self.reply.tool_full(call, fin) if call is not None \
            else self.reply.full(text, fin, self.all_lps if self.want_lp else None)
        return web.json_response(out, dumps=dumps)


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    gen, stream, include_usage, tools = to_request(await read_body(request), gw.generation,
                                                   chat)
    # The model named in the body (ModelNotFound: 404); with one [model] any name is it.
    sched = gw.route(gen.model, lenient=True)
    dialect = OpenAIDialect(Reply(chat, sched.model), stream, include_usage, tools,
                            gen.logprobs)
    return await exchange(gw, request, gen, dialect, sched)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)

