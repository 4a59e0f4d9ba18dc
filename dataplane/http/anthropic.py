"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``,
parsed into the one request type and answered in Anthropic's shapes
(``anthropic_shapes.py``), streamed or not (``exchange.py``).

A conversation's content blocks become messages for the model's chat template: ``text``
blocks are the turn's text, an assistant's ``tool_use`` blocks its calls and a user's
``tool_result`` blocks ``role: "tool"`` messages, whose ``tool_use_id`` must name an
earlier call (``tool_calls.py``).  ``thinking`` blocks of earlier turns are dropped (this
server does not think aloud), and so are ``thinking``, ``context_management`` and
``output_config.effort``, which only steer thinking (``output_config.format``, a JSON
schema, constrains the answer); a ``role: "system"`` message
between turns is a system message.  Images and documents are refused with a 400, as are
server tools.  Authentication is ``x-api-key`` (or a bearer token), as for every /v1
route; ``anthropic-version`` and ``anthropic-beta`` are accepted and not needed.
"""
from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from llmctl.common.errors import BadRequest
from llmctl.common.request import GenRequest, validate
from llmctl.dataplane.http.anthropic_shapes import AnthropicDialect
from llmctl.dataplane.http.base import GATEWAY_KEY, read_body
from llmctl.dataplane.http.exchange import exchange, utility
from llmctl.dataplane.http.tool_calls import (ToolMode, assistant, check_result_id,
                                              check_tools, make_mode, offer, tool)

PATH = "/v1/messages"
_SKIPPED = ("thinking", "redacted_thinking")            # earlier turns' thoughts
_UNSUPPORTED = ("container", "mcp_servers")


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise BadRequest(f"{where} must be a string or a list of content blocks",
                         param="messages")
    return content


def _text(content: Any, where: str) -> str:
    """The text of a string or of text blocks (a system prompt, a tool's result)."""
    texts = []
    for j, b in enumerate(_blocks(content, where)):
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise BadRequest(f"{where}[{j}]: only text blocks are supported here",
                             param="messages")
        texts.append(b["text"])
    return "\n".join(texts)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation as messages for the chat template."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages: a non-empty list is required", param="messages")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text(system, "system")})
    ids: set[str] = set()
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":                 # Claude Code's context between turns
            out.append({"role": "system", "content": _text(m.get("content"),
                                                           f"messages[{i}].content")})
            continue
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be \"user\" or \"assistant\"",
                             param="messages")
        texts: list[str] = []
        calls: list[tuple[str, Any]] = []
        for j, b in enumerate(_blocks(m.get("content"), f"messages[{i}].content")):
            kind, where = b.get("type"), f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise BadRequest(f"{where}: a tool_use needs an id and a name",
                                     param="messages")
                ids.add(b["id"])
                calls.append((b["name"], b.get("input") or {}))
            elif kind == "tool_result" and role == "user":
                check_result_id(b.get("tool_use_id"), ids, f"{where}.tool_use_id", "messages")
                result = _text(b.get("content") or "", f"{where}.content")
                if b.get("is_error"):
                    result = "Error: " + result
                if texts:
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                out.append({"role": "tool", "content": result})
            elif kind in _SKIPPED:
                continue
            else:
                raise BadRequest(f"{where}: content blocks of type {kind!r} are not "
                                 f"supported here", param="messages")
        if role == "assistant":
            out.append(assistant("\n".join(texts), calls))
        elif texts or not out or out[-1]["role"] != "tool":
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tool_mode(body: dict[str, Any]) -> ToolMode | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in
                                   ("auto", "any", "tool", "none")):
        raise BadRequest('tool_choice must be {"type": "auto"|"any"|"tool"|"none"}',
                         param="tool_choice")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", param="tools")
    specs = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") not in (None, "custom"):
            kind = t.get("type") if isinstance(t, dict) else None
            raise BadRequest(f"tools[{i}]: server tools ({kind!r}) are not supported",
                             param="tools")
        specs.append(tool(t.get("name"), t.get("description"), t.get("input_schema"),
                          f"tools[{i}]", "tools"))
    check_tools(specs, "tools")
    choice = choice or {"type": "auto"}
    kind = choice["type"]
    name = {"auto": "auto", "any": "required", "none": "none"}.get(kind, choice.get("name"))
    if not isinstance(name, str):
        raise BadRequest('tool_choice {"type": "tool"} needs a name', param="tool_choice")
    return make_mode(specs, name, not choice.get("disable_parallel_tool_use"))


def to_request(body: dict[str, Any], gen: Any,
               counting: bool = False) -> tuple[GenRequest, bool, ToolMode | None]:
    """(the request, stream?, tool calling) of a Messages body; ``counting``: for
    count_tokens (no max_tokens needed)."""
    for key in _UNSUPPORTED:
        if body.get(key) is not None:
            raise BadRequest(f"{key} is not supported", param=key)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    if not counting and body.get("max_tokens") is None:
        raise BadRequest("max_tokens: field required", param="max_tokens")
    mode = _tool_mode(body)
    oc = body.get("output_config")
    fmt = oc.get("format") if isinstance(oc, dict) else None
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"
                            or mode is not None):
        raise BadRequest('output_config.format must be {"type": "json_schema", "schema": '
                         '...}, without tools', param="output_config")
    obj = {"messages": offer(_messages(body), mode),
           "response_format": fmt and {"type": "json_schema",
                                       "json_schema": {"schema": fmt.get("schema")}},
           "max_tokens": 1 if counting else body.get("max_tokens"),
           "stop": body.get("stop_sequences") or None,
           **{k: body.get(k) for k in ("temperature", "top_p", "top_k", "model")}}
    try:
        request = validate(obj, gen)
    except BadRequest as err:
        raise BadRequest(err.message.replace("stop ", "stop_sequences ", 1)) from None
    if mode is not None:
        request = msgspec.structs.replace(request, json_schema=mode.schema,
                                          or_text=mode.or_text)
    return request, bool(stream), mode


async def messages(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    gen, stream, mode = to_request(await read_body(request), gw.generation)
    sched = gw.route(gen.model, lenient=True)
    return await exchange(gw, request, gen, AnthropicDialect(sched.model, stream, mode), sched)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """The prompt's tokens, after the chat template, tools included."""
    gw = request.app[GATEWAY_KEY]
    gen, _, _ = to_request(await read_body(request), gw.generation, counting=True)
    sched = gw.route(gen.model, lenient=True)
    return await utility(gw, request, GenRequest(tokenize=True, messages=gen.messages,
                                                 model=gen.model),
                         lambda fin: {"input_tokens": fin.prompt_tokens}, sched)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PATH, messages)
    app.router.add_post(PATH + "/count_tokens", count_tokens)

