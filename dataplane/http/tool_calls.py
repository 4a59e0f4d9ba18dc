"""Tool calls on the OpenAI chat API: ``tools``, ``tool_choice``, ``tool_calls``.

The model is told about the tools in a system message (the request's own system
message, if any, comes first) and its call is constrained, while it is sampled, by a JSON
schema the worker converts to a grammar (``worker/constrain.py``):

    {"name": <one of the tools' names>, "arguments": <that tool's parameters schema>}

one ``anyOf`` branch per tool.  ``tool_choice``:

* ``"none"``: the tools are not offered; a plain answer;
* ``"auto"`` (the default with tools): the call's JSON *or* free text that does not start
  with ``{`` (``or_text``); an answer that starts with ``{`` is a call;
* ``"required"``: one call of any tool;
* ``{"type": "function", "function": {"name": N}}``: one call of tool N.

Earlier turns are rendered with the model's own chat template: an assistant message's
``tool_calls`` become its content, in the format above (one call a line), and
``role: "tool"`` messages keep their role (the template renders it, e.g. ChatML's
``<|im_start|>tool``).  One call per answer (``parallel_tool_calls`` is accepted, at
most one call is made).  A call cut by ``max_tokens`` is not whole JSON: it is returned as
text with ``finish_reason: "length"``.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llmctl.common.errors import BadRequest
from llmctl.common.structured import schema_text

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolMode:
    names: tuple[str, ...]        # the tools the answer may call
    schema: str                   # the call's JSON schema (text)
    or_text: bool                 # "auto": or a plain answer
    prompt: str                   # the system text that offers the tools


def _tools(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v or len(v) > MAX_TOOLS:
        raise BadRequest(f"tools must be a list of 1 to {MAX_TOOLS} tools", param="tools")
    out, seen = [], set()
    for i, t in enumerate(v):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadRequest(f"tools[{i}].function.name must match {NAME.pattern}", param="tools")
        if name in seen:
            raise BadRequest(f"tools[{i}]: a second tool named {name!r}", param="tools")
        seen.add(name)
        params = fn.get("parameters", NO_PARAMETERS)
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise BadRequest(f"tools[{i}].function.description must be a string", param="tools")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def tool_mode(body: dict[str, Any]) -> ToolMode | None:
    """The tool calling a chat request asks for (None: none, answer in words)."""
    for key in ("functions", "function_call"):
        if body.get(key) is not None:
            raise BadRequest(f"{key} is not supported: use tools and tool_choice", param=key)
    tools, choice = body.get("tools"), body.get("tool_choice")
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise BadRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return None
    fns = _tools(tools)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest('tool_choice must be "none", "auto", "required" or '
                       '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        fns_called = [f for f in fns if f["name"] == name]
        if not fns_called:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    elif choice in ("auto", "required"):
        fns_called = fns
    else:
        raise BadRequest('tool_choice must be "none", "auto", "required" or a named function', param="tool_choice")
    branches = [{"type": "object", "properties": {
        "name": {"const": f["name"]}, "arguments": f["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False} for f in fns_called]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    lines = ["You can call these tools (functions):"]
    lines += [json.dumps(f, ensure_ascii=False) for f in fns]
    lines.append('To call a tool, reply with only a JSON object: {"name": <the tool\'s name>, '
                 '"arguments": <an object of its parameters>}.')
    if choice == "auto":
        lines.append("If no tool is needed, answer in words.")
    return ToolMode(names=tuple(f["name"] for f in fns_called),
                    schema=schema_text(schema, "the tools' parameters"),
                    or_text=choice == "auto",
                    prompt="\n".join(lines))


def _call_text(call: Any, i: int) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"messages[{i}].tool_calls: each needs function.name", param="messages")
    args = fn.get("arguments", "{}")
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise BadRequest(f"messages[{i}].tool_calls: arguments must be a JSON string", param="messages") from None
    return json.dumps({"name": fn["name"], "arguments": parsed}, ensure_ascii=False)


def render_messages(messages: list[Any], mode: ToolMode | None) -> list[Any]:
    """The conversation as (role, content) messages for the chat template: tool calls of
    earlier turns written as their JSON, the tools offered in the system message."""
    out: list[Any] = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest(f"messages[{i}].tool_calls must be a list", param="messages")
            text = "\n".join(_call_text(c, i) for c in calls)
            content = m.get("content")
            if isinstance(content, str) and content:
                text = content + "\n" + text
            m = {"role": m.get("role"), "content": text}
        out.append(m)
    if mode is not None:
        if out and isinstance(out[0], dict) and out[0].get("role") == "system" \
                and isinstance(out[0].get("content"), str):
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + mode.prompt}
        else:
            out.insert(0, {"role": "system", "content": mode.prompt})
    return out


def parse_call(text: str, mode: ToolMode) -> dict[str, Any] | None:
    """The OpenAI ``tool_calls`` entry of an answer, or None if it is not a whole call."""
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in mode.names:
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"],
                         "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}}
