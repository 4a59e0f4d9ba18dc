"""Anthropic's Messages API shapes: the message object, its streamed events and its
errors (``{"type": "error", "error": {"type", "message"}}``, llmctl's codes mapped once
to Anthropic's statuses and types)."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from llmctl.common.errors import Code, LlmctlError
from llmctl.common.messages import Finished
from llmctl.dataplane.http.base import error_headers
from llmctl.dataplane.http.openai_shapes import dumps
from llmctl.dataplane.http.tool_calls import ToolMode
from llmctl.dataplane.http.tool_stream import Answer, Args, End, Start, Text, new_id, read_whole

# llmctl's error codes as Anthropic's statuses (an error's own status, e.g. a missing
# model's 404, wins), and each status's error type.
_STATUS = {Code.PROTOCOL: 400, Code.TOO_LARGE: 413, Code.UNAUTHORIZED: 401,
           Code.BAD_REQUEST: 400, Code.TOO_MANY_STREAMS: 429, Code.OVERLOADED: 529,
           Code.RATE_LIMITED: 429, Code.NOT_READY: 529, Code.SHUTTING_DOWN: 529,
           Code.TIMEOUT: 504, Code.WORKER_FAILED: 500, Code.SLOW_CLIENT: 408,
           Code.INTERNAL: 500}
_TYPE = {400: "invalid_request_error", 401: "authentication_error",
         403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
         408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
         500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
         529: "overloaded_error"}


def status(err: LlmctlError) -> int:
    return err.status if err.status is not None else _STATUS[err.code]


def error_body(err: LlmctlError) -> dict[str, Any]:
    st = status(err)
    kind = _TYPE.get(st, "invalid_request_error" if st < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_response(err: LlmctlError) -> web.Response:
    return web.json_response(error_body(err), status=status(err),
                             headers=error_headers(err), dumps=dumps)


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {dumps({'type': kind, **obj})}\n\n".encode("utf-8")


def stop_reason(fin: Finished, called: bool) -> str:
    if called:
        return "tool_use"
    if fin.stop_word:
        return "stop_sequence"
    return "max_tokens" if fin.finish_reason == "length" else "end_turn"


def usage(fin: Finished) -> dict[str, int]:
    return {"input_tokens": fin.prompt_tokens, "output_tokens": fin.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": fin.cached_tokens or 0}


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return {}


class AnthropicDialect:
    """One Messages request's events in Anthropic's shapes (``exchange.Dialect``):
    ``message_start`` and a ``ping``, a content block per text or ``tool_use`` (its
    ``input`` streamed as ``input_json_delta``), ``message_delta`` with the stop reason
    and usage, ``message_stop``."""

    def __init__(self, model: str, streaming: bool, tools: ToolMode | None) -> None:
        self.id = new_id("msg_")
        self.model = model
        self.streaming = streaming
        self.tools = tools
        self.calls = Answer(tools, "toolu_") if tools is not None else None
        self.parts: list[str] = []        # collected
        self.block = -1                   # the open content block's index (-1: none)
        self.kind = ""                    # its type: "text" or "tool_use"
        self.blocks = 0                   # content blocks started

    def message(self, content: list[dict[str, Any]], reason: str | None,
                use: dict[str, int], stop: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason, "stop_sequence": stop,
                "usage": use}

    def head(self) -> bytes:
        start = self.message([], None, {"input_tokens": 0, "output_tokens": 0})
        return _event("message_start", {"message": start}) + _event("ping", {})

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        pass                                       # not in Anthropic's API

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block, self.kind = self.blocks, kind
        self.blocks += 1
        return out + _event("content_block_start",
                            {"index": self.block, "content_block": block})

    def _close(self) -> bytes:
        if self.block < 0:
            return b""
        out = _event("content_block_stop", {"index": self.block})
        self.block = -1
        return out

    def _text(self, text: str) -> bytes:
        out = b"" if self.kind == "text" and self.block >= 0 \
            else self._open("text", {"type": "text", "text": ""})
        return out + _event("content_block_delta", {
            "index": self.block, "delta": {"type": "text_delta", "text": text}})

    def token(self, text: str) -> bytes | None:
        if not self.streaming:
            self.parts.append(text)
            return None
        if self.calls is None:
            return self._text(text)
        out = []
        for ev in self.calls.feed(text):
            if isinstance(ev, Text):
                out.append(self._text(ev.text))
            elif isinstance(ev, Start):
                out.append(self._open("tool_use", {"type": "tool_use", "id": ev.id,
                                                   "name": ev.name, "input": {}}))
            elif isinstance(ev, Args):
                out.append(_event("content_block_delta", {
                    "index": self.block,
                    "delta": {"type": "input_json_delta", "partial_json": ev.delta}}))
            elif isinstance(ev, End):
                out.append(self._close())
        return b"".join(out) or None

    def done(self, fin: Finished) -> bytes:
        calls, out = self.calls, []
        called = calls is not None and bool(calls.calling) and calls.whole
        if calls is not None and calls.calling and not calls.calls and calls.text():
            out.append(self._text(calls.text()))   # cut before a call began: as text
        out.append(self._close())
        out.append(_event("message_delta", {
            "delta": {"stop_reason": stop_reason(fin, called),
                      "stop_sequence": fin.stop_word if not called else None},
            "usage": usage(fin)}))
        out.append(_event("message_stop", {}))
        return b"".join(out)

    def error(self, err: LlmctlError) -> bytes:
        return _event("error", {"error": error_body(err)["error"]})

    def answer(self, fin: Finished) -> web.StreamResponse:
        text = "".join(self.parts)
        calls = read_whole(text, self.tools, "toolu_") if self.tools else None
        if calls:
            content = [{"type": "tool_use", "id": c.id, "name": c.name,
                        "input": _input(c.arguments)} for c in calls]
        else:
            content = [{"type": "text", "text": text}] if text else []
        return web.json_response(self.message(content, stop_reason(fin, bool(calls)),
                                              usage(fin), None if calls else fin.stop_word),
                                 dumps=dumps)
