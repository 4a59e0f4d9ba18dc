"""OpenAI's API: ``POST /v1/chat/completions`` and ``/v1/completions``, parsed into the
one request type and rendered back in OpenAI's shapes (``openai_shapes.py``), streamed
or not (``exchange.py``).

Fields that would change the answer and are not implemented are refused with a 400
naming them (``_UNSUPPORTED``, ``_ONLY``, ``llama_shapes.NOOP``), never ignored.
llama-server's extensions are read as it reads them: ``n_predict`` beside ``max_tokens``
(it wins), ``logit_bias``, ``min_p``, the penalties, ``samplers``, ``cache_prompt``,
``id_slot``, ``chat_template_kwargs`` (``llama_shapes.sampling_fields``); ``n`` > 1 is
that many requests (``_choices``); answers have llama-server's additions
(``LlamaAdditions``).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
from aiohttp import web

from llmctl.common.errors import BadRequest, LlmctlError
from llmctl.common.messages import Finished
from llmctl.common.request import GenRequest, MAX_OUTPUT, validate
from llmctl.dataplane.http.exchange import exchange
from llmctl.dataplane.http.llama_shapes import sampling_fields, timings
from llmctl.dataplane.http.openai_shapes import Reply, dumps
from llmctl.dataplane.http.base import GATEWAY_KEY, error_body, read_body
from llmctl.dataplane.http.tool_calls import ToolMode, render_messages, tool_mode
from llmctl.dataplane.http.tool_stream import Answer, Args, Call, Start, Text, read_whole

# OpenAI fields whose other values would change the answer's shape: refused, not ignored.
_ONLY = {"n": 1, "best_of": 1, "echo": False, "suffix": ""}     # n: _complete reads it
# Fields that would change the answer and that llmctl does not implement: refused unless
# absent or at their no-op value (0, empty, null).
_UNSUPPORTED = ("audio", "prediction", "web_search_options", "reasoning_effort")
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
    # logprob entries carry token ids, as llama-server's
    request = msgspec.structs.replace(request, token_ids=request.logprobs,
                                      **sampling_fields(body))
    if mode is not None:
        request = msgspec.structs.replace(request, json_schema=mode.schema, or_text=mode.or_text)
    return request, stream, include_usage, mode


def _event(obj: dict[str, Any]) -> bytes:
    """One SSE event."""
    return f"data: {dumps(obj)}\n\n".encode("utf-8")


def openai_call(c: Call) -> dict[str, Any]:
    return {"id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments}}


class OpenAIDialect:
    """One chat or text completion's events in OpenAI's shapes (``exchange.Dialect``).
    With tools, the answer is read as it comes (``tool_stream.Answer``): each call's id
    and name, then its arguments as they are generated, one ``tool_calls`` delta each."""

    def __init__(self, reply: Reply, streaming: bool, include_usage: bool,
                 tools: ToolMode | None, want_logprobs: bool) -> None:
        self.reply = reply
        self.streaming = streaming
        self.include_usage = include_usage
        self.tools = tools
        self.want_lp = want_logprobs
        self.calls = Answer(tools) if tools is not None else None
        self.parts: list[str] = []               # the text held: collected
        self.lps: list[dict[str, Any]] = []      # logprobs of the tokens behind the next piece
        self.all_lps: list[dict[str, Any]] = []  # collected
        self.offset = 0                          # characters sent (completions' text_offset)

    def head(self) -> bytes:
        # OpenAI's first chat chunk: the role
        return _event(self.reply.chunk("", role=True)) if self.reply.chat else b""

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        (self.lps if self.streaming else self.all_lps).extend(content)

    def token(self, text: str) -> bytes | None:
        if not self.streaming:
            self.parts.append(text)               # held in memory, bounded by max_tokens
            return None
        if self.calls is not None:
            deltas = []
            for ev in self.calls.feed(text):
                if isinstance(ev, Text):
                    return self.reply.token_event(ev.text)
                if isinstance(ev, Start):
                    deltas.append({"index": ev.index, "id": ev.id, "type": "function",
                                   "function": {"name": ev.name, "arguments": ""}})
                elif isinstance(ev, Args):
                    deltas.append({"index": ev.index, "function": {"arguments": ev.delta}})
            return _event(self.reply.tool_chunk(deltas)) if deltas else None
        if self.want_lp:
            data = _event(self.reply.chunk(text, logprobs=self.lps, offset=self.offset))
            self.offset += len(text)
            self.lps = []
            return data
        return self.reply.token_event(text)

    def done(self, fin: Finished) -> bytes:
        out, reason = [], self.reply.finish_reason(fin)
        calls = self.calls
        if calls is not None and calls.calling:
            if calls.whole:
                reason = "tool_calls"
            elif not calls.calls:      # cut by max_tokens before a call began: as text
                out.append(_event(self.reply.chunk(calls.text())))
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
        calls = read_whole(text, self.tools) if self.tools else None
        out = self.reply.tool_full([openai_call(c) for c in calls], fin) if calls \
            else self.reply.full(text, fin, self.all_lps if self.want_lp else None)
        return web.json_response(out, dumps=dumps)


MAX_N = 16


def _n(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise BadRequest(f"n must be an integer in [1, {MAX_N}]", param="n")
    if n > 1 and body.get("stream"):
        raise BadRequest("n > 1 is not supported with stream", param="n")
    return n


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await read_body(request)
    n = _n(body)
    gen, stream, include_usage, tools = to_request({**body, "n": None}, gw.generation, chat)
    # The model named in the body (ModelNotFound: 404); with one [model] any name is it.
    sched = gw.route(gen.model, lenient=True)
    if n > 1:
        return await _choices(request, gen, n, chat, tools, sched)
    return await exchange(gw, request, gen,
                          _dialect(gen, chat, sched.model, stream, include_usage, tools), sched)


def _dialect(gen: GenRequest, chat: bool, model: str, stream: bool, include_usage: bool,
             tools: ToolMode | None) -> Any:
    dialect = OpenAIDialect(Reply(chat, model), stream, include_usage, tools, gen.logprobs)
    prefill = gen.messages[-1].content if chat and gen.messages and len(gen.messages) > 1 \
        and gen.messages[-1].role == "assistant" else ""
    return LlamaAdditions(dialect, prefill)


class LlamaAdditions:
    """llama-server's additions to an OpenAI answer: a chat whose last message is the
    assistant's is continued by the worker (a prefill), and the answer is the whole
    message, that text first; a stream's finish chunk carries the ``timings``."""

    def __init__(self, inner: OpenAIDialect, prefill: str) -> None:
        self.inner, self.prefill = inner, prefill
        self.streaming = inner.streaming

    def _pending(self) -> bytes:
        text, self.prefill = self.prefill, ""
        return (self.inner.token(text) or b"") if text else b""

    def head(self) -> bytes:
        return self.inner.head()

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        self.inner.logprobs(content)

    def token(self, text: str) -> bytes | None:
        if self.prefill:
            text, self.prefill = self.prefill + text, ""
        return self.inner.token(text)

    def done(self, fin: Finished) -> bytes:
        self.inner.reply.timings = timings(fin)
        return self._pending() + self.inner.done(fin)

    def error(self, err: LlmctlError) -> bytes:
        return self.inner.error(err)

    def answer(self, fin: Finished) -> web.StreamResponse:
        self._pending()
        return self.inner.answer(fin)


async def _choices(request: web.Request, gen: GenRequest, n: int, chat: bool,
                   tools: ToolMode | None, sched: Any) -> web.StreamResponse:
    """``n`` choices: ``n`` requests (seeds ``seed + i``), each admitted as any, run
    together; one answer with their choices and their tokens counted together."""
    gw = request.app[GATEWAY_KEY]
    slots = sum(w.slots for w in sched.workers.values())
    if slots and n > slots:          # llama-server's bound too: each choice holds a slot
        raise BadRequest(f"n must be at most {slots} (the model's slots)", param="n")
    try:
        async with asyncio.TaskGroup() as tg:      # one failing cancels the others
            tasks = [tg.create_task(exchange(
                gw, request, msgspec.structs.replace(
                    gen, seed=None if gen.seed is None else (gen.seed + i) & 0xFFFFFFFF),
                _dialect(gen, chat, sched.model, False, False, tools), sched))
                for i in range(n)]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None       # the first error, rendered as any
    answers = [json.loads(t.result().body) for t in tasks]   # type: ignore[attr-defined]
    out = answers[0]
    out["choices"] = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
    done = sum(a["usage"]["completion_tokens"] for a in answers)
    out["usage"] = {**out["usage"], "completion_tokens": done,
                    "total_tokens": out["usage"]["prompt_tokens"] + done}
    return web.json_response(out, dumps=dumps)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)

