"""An answer to a request with tools, read as it is generated: text, or calls whose
arguments stream as they are written.

``Answer.feed(text)`` takes the answer's pieces as the tokens come and returns what they
made known, in order:

* ``Text(text)``: the answer is words (with ``auto``, it does not start with ``{``);
* ``Start(index, id, name)``: a call began (its name is whole);
* ``Args(index, delta)``: more of that call's arguments, the model's JSON text as written;
* ``End(index)``: the call is whole.

The answer's format is ``tool_calls.py``'s (``{"tool_calls": [{"name", "arguments"}]}``,
under the grammar, ``name`` first), so one pass over the characters, tracking strings and
nesting, finds each call's name and the span of its arguments.  ``calls`` are the calls
that ended; ``whole`` says the answer was complete JSON (not cut by ``max_tokens``).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Union

from llmctl.dataplane.http.tool_calls import ToolMode

CALL_DEPTH = 3          # {"tool_calls": [ {call} ]}: a call's members are at this depth


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Start:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class Args:
    index: int
    delta: str


@dataclass(frozen=True)
class End:
    index: int


Event = Union[Text, Start, Args, End]


@dataclass
class Call:
    id: str
    name: str = ""
    arguments: str = ""          # the JSON text of its arguments, as the model wrote it
    started: bool = False
    done: bool = False


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass
class Answer:
    """One answer's reader (``mode``: the request's tools; ``id_prefix``: its dialect's
    call ids, e.g. ``call_`` or ``toolu_``)."""
    mode: ToolMode
    id_prefix: str = "call_"
    calling: bool | None = None            # None: not known until the first character
    calls: list[Call] = field(default_factory=list)
    buf: str = ""
    pos: int = 0                           # characters of buf scanned
    depth: int = 0
    in_str: bool = False
    esc: bool = False
    str_from: int = 0
    key: str | None = None                 # the call member being read
    want_key: bool = False
    args_from: int = -1                    # where the arguments' text began (-1: not yet)
    sent: int = 0                          # characters of the arguments sent
    closed: bool = False                   # the top-level object ended

    def __post_init__(self) -> None:
        if not self.mode.or_text:
            self.calling = True

    @property
    def whole(self) -> bool:
        return self.closed and all(c.done for c in self.calls) and bool(self.calls)

    def text(self) -> str:
        return self.buf

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        if self.calling is None:
            self.calling = text.startswith("{")
        self.buf += text
        if not self.calling:
            return [Text(text)]
        out: list[Event] = []
        for i in range(self.pos, len(self.buf)):
            self._step(i, self.buf[i], out)
        self.pos = len(self.buf)
        self._flush(len(self.buf), out)
        return out

    def _call(self) -> Call | None:
        return self.calls[-1] if self.calls and not self.calls[-1].done else None

    def _flush(self, upto: int, out: list[Event]) -> None:
        call = self._call()
        if call is None or not call.started or self.args_from < 0:
            return
        if call.arguments:                           # they ended: nothing after them
            upto = min(upto, self.args_from + len(call.arguments))
        start = self.args_from + self.sent
        if upto > start:
            out.append(Args(len(self.calls) - 1, self.buf[start:upto]))
            self.sent = upto - self.args_from

    def _step(self, i: int, ch: str, out: list[Event]) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.depth == CALL_DEPTH:
                    self._string(json.loads(self.buf[self.str_from:i + 1]), out)
            return
        if ch == '"':
            self.in_str, self.str_from = True, i
            if self.depth == CALL_DEPTH and not self.want_key and self.key == "arguments" \
                    and self.args_from < 0:
                self.args_from = i
            return
        if ch in "{[":
            self.depth += 1
            if self.depth == CALL_DEPTH:
                self.calls.append(Call(new_id(self.id_prefix)))
                self.want_key = True
            elif self.depth == CALL_DEPTH + 1 and self.key == "arguments" \
                    and self.args_from < 0:
                self.args_from = i
        elif ch in "}]":
            call = self._call()
            if self.depth == CALL_DEPTH + 1 and call is not None \
                    and self.key == "arguments" and self.args_from >= 0:
                call.arguments = self.buf[self.args_from:i + 1]
            if self.depth == CALL_DEPTH:
                self._end_call(i, out)
            self.depth -= 1
            if self.depth == 0:
                self.closed = True
        elif self.depth == CALL_DEPTH:
            if ch == ":":
                self.want_key = False
            elif ch == ",":
                self._end_value(i)
                self.want_key = True
            elif not ch.isspace() and self.key == "arguments" and self.args_from < 0:
                self.args_from = i                   # arguments that are not an object

    def _string(self, value: str, out: list[Event]) -> None:
        call = self._call()
        if call is None:
            return
        if self.want_key:
            self.key = value
            if value == "arguments":
                self.args_from, self.sent = -1, 0
        elif self.key == "name" and not call.started:
            call.name, call.started = value, True
            out.append(Start(len(self.calls) - 1, call.id, value))

    def _end_value(self, i: int) -> None:
        call = self._call()
        if call is not None and self.key == "arguments" and self.args_from >= 0 \
                and not call.arguments:
            call.arguments = self.buf[self.args_from:i].rstrip()

    def _end_call(self, i: int, out: list[Event]) -> None:
        call = self._call()
        if call is None:
            return
        self._end_value(i)
        if self.args_from >= 0:
            self._flush(self.args_from + len(call.arguments), out)
        call.arguments = call.arguments or "{}"
        if not call.started:                         # no name: not a call of a tool
            return
        call.done = True
        self.key, self.args_from, self.sent = None, -1, 0
        out.append(End(len(self.calls) - 1))


def read_whole(text: str, mode: ToolMode, id_prefix: str = "call_") -> list[Call] | None:
    """The calls of a whole answer, or None if it is words or not whole calls."""
    a = Answer(mode, id_prefix)
    a.feed(text)
    if not a.calling or not a.whole:
        return None
    if any(c.name not in mode.names for c in a.calls):
        return None
    return a.calls
