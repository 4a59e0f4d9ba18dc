"""Tool calls, for every HTTP dialect: the tools offered, the grammar of an answer that
calls them, and earlier turns' calls and results rendered for the chat template.

A dialect reads its own shapes (OpenAI chat's ``tools``/``tool_choice``, Anthropic's,
the Responses API's) into ``Tool``s and a choice, and ``make_mode`` gives the
``ToolMode``: the model is told about the tools in a system message (the request's own
system message, if any, comes first) and its answer is constrained, while it is sampled,
by a JSON schema the worker converts to a grammar (``worker/constrain.py``):

    {"tool_calls": [{"name": <a tool's name>, "arguments": <its parameters>}, ...]}

one ``anyOf`` branch per tool, ``name`` before ``arguments``, at most ``MAX_CALLS``
calls (one unless parallel calls are allowed: a small model, once it has begun a list,
tends to repeat its call until the list is full).  The choice:

* ``none``: the tools are not offered; a plain answer;
* ``auto`` (the default with tools): the calls' JSON *or* free text that does not start
  with ``{`` (``or_text``); an answer that starts with ``{`` is calls;
* ``required``: calls of any tools;
* a tool's name: calls of that tool.

``tool_stream.py`` reads such an answer as it is generated.  Earlier turns reach the
template as plain messages: an assistant message's calls become its content in the
format above, and a tool's result is a ``role: "tool"`` message (the template renders
it, e.g. ChatML's ``<|im_start|>tool``) whose id must name a call of an earlier
assistant message.  A call cut by ``max_tokens`` is not whole JSON: it is returned as
text with the dialect's "length" reason.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llmctl.common.errors import BadRequest
from llmctl.common.request import schema_text

NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_TOOLS = 128
MAX_CALLS = 4            # calls in one answer
PROMPT_BUDGET = 6000     # characters of tool descriptions offered in full; past it, brief
BRIEF_DESCRIPTION = 160  # characters of a description, brief
_BRIEF_DROP = ("description", "$schema", "title", "examples", "default", "$comment")
NO_PARAMETERS = {"type": "object", "properties": {}}
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolMode:
    names: tuple[str, ...]        # the tools the answer may call
    schema: str                   # the answer's JSON schema (text)
    or_text: bool                 # "auto": or a plain answer
    prompt: str                   # the system text that offers the tools
    parallel: bool = True         # several calls in one answer


def tool(name: Any, description: Any, parameters: Any, where: str, param: str) -> Tool:
    """One tool, checked (``where`` names it in errors, ``param`` is the request field)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(f"{where}.name must match {NAME.pattern}", param=param)
    if parameters is None:
        parameters = NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: the parameters must be a JSON schema object", param=param)
    schema_text(parameters, f"{where}'s parameters")        # travels to the worker
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise BadRequest(f"{where}.description must be a string", param=param)
    return Tool(name, description, parameters)


def check_tools(tools: list[Tool], param: str) -> list[Tool]:
    if not tools or len(tools) > MAX_TOOLS:
        raise BadRequest(f"{param} must be a list of 1 to {MAX_TOOLS} tools", param=param)
    seen: set[str] = set()
    for t in tools:
        if t.name in seen:
            raise BadRequest(f"{param}: a second tool named {t.name!r}", param=param)
        seen.add(t.name)
    return tools


_TYPED = ("type", "enum", "const", "properties", "items", "anyOf", "oneOf", "allOf",
          "$ref", "pattern", "format", "prefixItems", "additionalProperties")
ANY_VALUE = {"type": ["string", "number", "boolean", "object", "array", "null"]}
MAX_BOUND = 256          # a larger maxLength/maxItems is not held by the grammar


def _json_schema(schema: Any) -> Any:
    """A tool's parameters as the converter takes them: ``$schema`` (a URL) dropped, and
    a subschema that says nothing of its value (``{"description": ...}``: any JSON
    value, which the converter refuses) written as the union of every type.  A
    ``maxLength`` or ``maxItems`` over ``MAX_BOUND`` is left out: the converter writes one
    nested rule per unit of the bound (megabytes of grammar for an agent's
    ``maxLength: 100000``)."""
    if isinstance(schema, list):
        return [_json_schema(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$schema" or (k in ("maxLength", "maxItems") and isinstance(v, int)
                               and v > MAX_BOUND):
            continue
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: _json_schema(sub) for name, sub in v.items()}
        elif k in ("items", "anyOf", "oneOf", "allOf", "additionalProperties", "prefixItems"):
            out[k] = _json_schema(v)
        else:
            out[k] = v
    if not any(k in out for k in _TYPED):
        return {**out, **ANY_VALUE}
    return out


def make_mode(tools: list[Tool], choice: str, parallel: bool = True,
              param: str = "tool_choice") -> ToolMode | None:
    """The ToolMode of ``tools`` and a choice (``none``, ``auto``, ``required`` or a
    tool's name); None: a plain answer."""
    if choice == "none":
        return None
    if choice in ("auto", "required"):
        called = tools
    else:
        called = [t for t in tools if t.name == choice]
        if not called:
            raise BadRequest(f"{param} names {choice!r}, which is not among the tools",
                             param=param)
    branches = [{"type": "object", "properties": {
        "name": {"const": t.name}, "arguments": _json_schema(t.parameters)},
        "required": ["name", "arguments"], "additionalProperties": False} for t in called]
    call = branches[0] if len(branches) == 1 else {"anyOf": branches}
    calls = {"type": "array", "items": call, "minItems": 1,
             "maxItems": MAX_CALLS if parallel else 1}
    schema = {"type": "object", "properties": {"tool_calls": calls},
              "required": ["tool_calls"], "additionalProperties": False}
    lines = ["You can call these tools (functions):"] + _offers(tools)
    lines.append('To call tools, reply with only a JSON object: {"tool_calls": [{"name": '
                 '<the tool\'s name>, "arguments": <an object of its parameters>}'
                 + (", ...]}" if parallel else "]} (one call)") + ".")
    if choice == "auto":
        lines.append("If no tool is needed, answer in words.")
    return ToolMode(names=tuple(t.name for t in called),
                    schema=schema_text(schema, "the tools' parameters"),
                    or_text=choice == "auto", prompt="\n".join(lines), parallel=parallel)


def _brief_schema(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _brief_schema(v) for k, v in schema.items() if k not in _BRIEF_DROP
                or (k in ("description", "title") and isinstance(v, dict))}
    if isinstance(schema, list):
        return [_brief_schema(v) for v in schema]
    return schema


def _offers(tools: list[Tool]) -> list[str]:
    """The tools as the system message describes them: in full, or, past
    ``PROMPT_BUDGET`` (an agent's dozens of tools with pages of description each), each
    one's first sentence and its parameters without their descriptions, so that the
    offer fits the context.  The grammar holds the answer to the full schemas either way."""
    full = [json.dumps({"name": t.name, "description": t.description,
                        "parameters": t.parameters}, ensure_ascii=False) for t in tools]
    if sum(map(len, full)) <= PROMPT_BUDGET:
        return full
    out = []
    for t in tools:
        first = t.description.strip().split("\n", 1)[0].split(". ", 1)[0]
        if len(first) > BRIEF_DESCRIPTION:
            first = first[:BRIEF_DESCRIPTION - 3] + "..."
        out.append(json.dumps({"name": t.name, "description": first,
                               "parameters": _brief_schema(t.parameters)},
                              ensure_ascii=False, separators=(",", ":")))
    return out


# ---- OpenAI chat's shapes -------------------------------------------------------------

def tool_mode(body: dict[str, Any]) -> ToolMode | None:
    """The tool calling an OpenAI chat request asks for (None: none, answer in words)."""
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
    if not isinstance(tools, list):
        raise BadRequest(f"tools must be a list of 1 to {MAX_TOOLS} tools", param="tools")
    fns = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}',
                             param="tools")
        fns.append(tool(fn.get("name"), fn.get("description"), fn.get("parameters"),
                        f"tools[{i}].function", "tools"))
    check_tools(fns, "tools")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "function": {"name": ...}}',
                             param="tool_choice")
        choice = name
    elif choice not in CHOICES:
        raise BadRequest('tool_choice must be "none", "auto", "required" or a named function',
                         param="tool_choice")
    return make_mode(fns, choice, ptc is not False)


def calls_text(calls: list[tuple[str, Any]]) -> str:
    """Calls (name, arguments object) as the model writes them."""
    return json.dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in calls]},
                      ensure_ascii=False)


def arguments(args: Any, where: str, param: str) -> Any:
    """A call's arguments (a JSON string, or already an object) as an object."""
    try:
        return json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise BadRequest(f"{where}: arguments must be a JSON string", param=param) from None


def _call(call: Any, i: int) -> tuple[str, str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"messages[{i}].tool_calls: each needs function.name",
                         param="messages")
    cid = call.get("id")
    return (cid if isinstance(cid, str) else "", fn["name"],
            arguments(fn.get("arguments", "{}"), f"messages[{i}].tool_calls", "messages"))


def render_messages(messages: list[Any], mode: ToolMode | None) -> list[Any]:
    """An OpenAI chat conversation as (role, content) messages for the chat template:
    tool calls of earlier turns written as their JSON, the tools offered in the system
    message."""
    out: list[Any] = []
    ids: set[str] = set()
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise BadRequest(f"messages[{i}].tool_calls must be a list", param="messages")
            parsed = [_call(c, i) for c in calls]
            ids.update(cid for cid, _, _ in parsed if cid)
            m = assistant(m.get("content"), [(n, a) for _, n, a in parsed])
        elif isinstance(m, dict) and m.get("role") == "tool":
            check_result_id(m.get("tool_call_id"), ids, f"messages[{i}].tool_call_id",
                            "messages")
        out.append(m)
    return offer(out, mode)


def assistant(content: Any, calls: list[tuple[str, Any]]) -> dict[str, Any]:
    """An assistant turn that made ``calls`` (after its text, if any)."""
    text = calls_text(calls) if calls else ""
    if isinstance(content, str) and content:
        text = content + "\n" + text if text else content
    return {"role": "assistant", "content": text}


def check_result_id(cid: Any, ids: set[str], where: str, param: str) -> None:
    """A tool result's id must name a call made earlier in the conversation."""
    if not isinstance(cid, str) or cid not in ids:
        raise BadRequest(f"{where} must be the id of a tool call of an earlier assistant "
                         f"turn, got {cid!r}", param=param)


def offer(messages: list[Any], mode: ToolMode | None) -> list[Any]:
    """The messages with the tools offered in the system message."""
    if mode is None:
        return messages
    out = list(messages)
    if out and isinstance(out[0], dict) and out[0].get("role") == "system" \
            and isinstance(out[0].get("content"), str):
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + mode.prompt}
    else:
        out.insert(0, {"role": "system", "content": mode.prompt})
    return out
