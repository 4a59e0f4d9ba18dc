"""OpenAI's Responses API shapes: the response object, its output items (``message``
with ``output_text``, ``function_call``) and its streamed events, each with its
``sequence_number``."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from llmctl.common.errors import LlmctlError
from llmctl.common.messages import Finished
from llmctl.dataplane.http.base import error_body
from llmctl.dataplane.http.openai_shapes import dumps
from llmctl.dataplane.http.tool_calls import ToolMode
from llmctl.dataplane.http.tool_stream import Answer, Args, Call, End, Start, Text, new_id, \
    read_whole


def usage(fin: Finished) -> dict[str, Any]:
    p, c = fin.prompt_tokens, fin.completion_tokens
    return {"input_tokens": p, "input_tokens_details": {"cached_tokens": fin.cached_tokens or 0},
            "output_tokens": c, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + c}


def message_item(iid: str, text: str, status: str) -> dict[str, Any]:
    content = [] if status == "in_progress" else \
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": iid, "type": "message", "status": status, "role": "assistant",
            "content": content}


def call_item(iid: str, call: Call | Start, arguments: str, status: str) -> dict[str, Any]:
    return {"id": iid, "type": "function_call", "status": status, "call_id": call.id,
            "name": call.name, "arguments": arguments}


class ResponsesDialect:
    """One Responses request's events (``exchange.Dialect``).  ``params`` are the
    request's fields echoed in the response object; ``result`` is the final response
    object once the request ended (what is stored)."""

    def __init__(self, model: str, streaming: bool, tools: ToolMode | None,
                 params: dict[str, Any]) -> None:
        self.id = new_id("resp_")
        self.created = int(time.time())
        self.model = model
        self.streaming = streaming
        self.tools = tools
        self.params = params
        self.calls = Answer(tools, "call_") if tools is not None else None
        self.parts: list[str] = []            # the answer's text (both halves)
        self.output: list[dict[str, Any]] = []   # finished output items
        self.seq = 0
        self.item: dict[str, Any] | None = None  # the open item (streaming)
        self.args: list[str] = []             # the open call's arguments so far
        self.result: dict[str, Any] | None = None

    def response(self, status: str, fin: Finished | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "error": None, "incomplete_details": incomplete,
                "model": self.model, "output": list(self.output),
                "usage": usage(fin) if fin is not None else None, **self.params}

    def _event(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {dumps(obj)}\n\n".encode("utf-8")

    def head(self) -> bytes:
        r = self.response("in_progress")
        return self._event("response.created", response=r) + \
            self._event("response.in_progress", response=r)

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        pass

    def _added(self, item: dict[str, Any]) -> bytes:
        self.item = item
        return self._event("response.output_item.added", output_index=len(self.output),
                           item=item)

    def _text(self, text: str) -> bytes:
        out = b""
        if self.item is None:
            item = message_item(new_id("msg_"), "", "in_progress")
            out = self._added(item) + self._event(
                "response.content_part.added", item_id=item["id"],
                output_index=len(self.output), content_index=0,
                part={"type": "output_text", "text": "", "annotations": []})
        return out + self._event("response.output_text.delta", item_id=self.item["id"],
                                 output_index=len(self.output), content_index=0,
                                 delta=text, logprobs=[])

    def _close_text(self) -> bytes:
        item, text = self.item, "".join(self.parts)
        if item is None or item["type"] != "message":
            return b""
        done = message_item(item["id"], text, "completed")
        i = len(self.output)
        out = self._event("response.output_text.done", item_id=item["id"], output_index=i,
                          content_index=0, text=text, logprobs=[]) + \
            self._event("response.content_part.done", item_id=item["id"], output_index=i,
                        content_index=0, part=done["content"][0]) + \
            self._event("response.output_item.done", output_index=i, item=done)
        self.output.append(done)
        self.item = None
        return out

    def token(self, text: str) -> bytes | None:
        self.parts.append(text)
        if not self.streaming:
            return None
        if self.calls is None:
            return self._text(text)
        out = []
        for ev in self.calls.feed(text):
            if isinstance(ev, Text):
                out.append(self._text(ev.text))
            elif isinstance(ev, Start):
                self.args = []
                out.append(self._added(call_item(new_id("fc_"), ev, "", "in_progress")))
            elif isinstance(ev, Args) and self.item is not None:
                self.args.append(ev.delta)
                out.append(self._event("response.function_call_arguments.delta",
                                       item_id=self.item["id"],
                                       output_index=len(self.output), delta=ev.delta))
            elif isinstance(ev, End) and self.item is not None:
                args = "".join(self.args)
                done = {**self.item, "status": "completed", "arguments": args}
                i = len(self.output)
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=done["id"], output_index=i, arguments=args))
                out.append(self._event("response.output_item.done", output_index=i,
                                       item=done))
                self.output.append(done)
                self.item = None
        return b"".join(out) or None

    def _status(self, fin: Finished) -> str:
        return "incomplete" if fin.finish_reason == "length" else "completed"

    def done(self, fin: Finished) -> bytes:
        out = [self._close_text()]
        if self.calls is not None and self.calls.calling and not self.calls.calls \
                and self.parts:                  # cut before a call began: as text
            self.calls = None
            out.append(self._text("".join(self.parts)) + self._close_text())
        status = self._status(fin)
        self.result = self.response(status, fin)
        out.append(self._event(f"response.{status}", response=self.result))
        return b"".join(out)

    def error(self, err: LlmctlError) -> bytes:
        body = error_body(err)["error"]
        return self._event("error", code=body["code"], message=body["message"],
                           param=body["param"])

    def answer(self, fin: Finished) -> web.StreamResponse:
        text = "".join(self.parts)
        calls = read_whole(text, self.tools) if self.tools else None
        if calls:
            self.output = [call_item(new_id("fc_"), c, c.arguments, "completed")
                           for c in calls]
        elif text:
            self.output = [message_item(new_id("msg_"), text, "completed")]
        self.result = self.response(self._status(fin), fin)
        return web.json_response(self.result, dumps=dumps)
