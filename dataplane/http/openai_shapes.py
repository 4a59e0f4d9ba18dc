"""OpenAI's response objects (chat and text completions), tool calls included.  An answer,
and the last chunks of a stream (the finish reason's, the usage), carry llama-server's
``timings``."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from llmctl.common.messages import Finished
from llmctl.dataplane.http.llama_shapes import timings


def dumps(obj: Any) -> str:
    """JSON as the HTTP front writes it (compact, UTF-8)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class Reply:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self._event: tuple[bytes, bytes] | None = None   # token_event's template
        self.timings: dict[str, Any] | None = None       # the finish chunk's, when known

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(fin: Finished) -> dict[str, int]:
        p, c = fin.prompt_tokens, fin.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def finish_reason(fin: Finished) -> str:
        return fin.finish_reason           # the worker's stop / length

    def logprobs(self, entries: list[dict[str, Any]] | None,
                 offset: int = 0) -> dict[str, Any] | None:
        """OpenAI's logprobs object of some tokens (None: none were asked for).  Chat:
        ``{"content": [entry...]}``; completions: the legacy parallel lists, text offsets
        counted from ``offset``."""
        if entries is None:
            return None
        if self.chat:
            return {"content": entries, "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries],
                "text_offset": offsets}

    def full(self, text: str, fin: Finished,
             logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        fr = self.finish_reason(fin)
        lp = self.logprobs(logprobs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": lp, "finish_reason": fr}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": fr}
        return {**self._head(False), "choices": [choice], "usage": self.usage(fin),
                "timings": timings(fin)}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              role: bool = False, logprobs: list[dict[str, Any]] | None = None,
              offset: int = 0) -> dict[str, Any]:
        lp = self.logprobs(logprobs, offset)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lp,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp,
                      "finish_reason": finish_reason}
        if finish_reason is not None and self.timings is not None:
            return {**self._head(True), "choices": [choice], "timings": self.timings}
        return {**self._head(True), "choices": [choice]}

    def token_event(self, text: str) -> bytes:
        """The SSE event of one token without logprobs: ``chunk(text)`` as ``data: ...``,
        from a template made once per request (the hot path: one JSON string a token)."""
        if self._event is None:
            mark = "\x00"
            body = dumps(self.chunk(mark))
            head, tail = body.split(dumps(mark), 1)
            self._event = ("data: " + head).encode(), (tail + "\n\n").encode()
        head, tail = self._event
        return head + dumps(text).encode("utf-8") + tail

    def usage_chunk(self, fin: Finished) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": self.usage(fin),
                "timings": timings(fin)}

    def tool_full(self, calls: list[dict[str, Any]], fin: Finished) -> dict[str, Any]:
        """A chat answer that is tool calls."""
        choice = {"index": 0, "message": {"role": "assistant", "content": None,
                                          "tool_calls": calls},
                  "logprobs": None, "finish_reason": "tool_calls"}
        return {**self._head(False), "choices": [choice], "usage": self.usage(fin),
                "timings": timings(fin)}

    def tool_chunk(self, deltas: list[dict[str, Any]]) -> dict[str, Any]:
        """A streamed piece of tool calls: a call's id and name, or more of its arguments
        (``{"index": i, ...}`` entries)."""
        return {**self._head(True), "choices": [{"index": 0, "delta": {"tool_calls": deltas},
                                                 "logprobs": None, "finish_reason": None}]}
