"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE
/v1/responses/{id}``, ``POST /v1/responses/input_tokens``, parsed into the one request
type and answered in its shapes (``responses_shapes.py``), streamed or not
(``exchange.py``).

``input`` is a string or items: messages (``input_text``/``output_text`` parts),
``function_call`` and ``function_call_output`` (whose ``call_id`` must name an earlier
call), read into messages for the model's chat template (``tool_calls.py``);
``reasoning`` items are dropped (this server does not reason aloud), and so are the
``reasoning``, ``include``, ``prompt_cache_key`` and ``client_metadata`` settings.
Hosted tools (``web_search``) and tool namespaces are not offered (``_NOT_OFFERED``).  ``instructions``
is the system message of this request only.  ``text.format`` (JSON schema or object)
constrains the answer as ``response_format`` does on the chat API.

``store`` (true unless false) keeps the response and the conversation it ends in the
response store (``response_store.py``); ``previous_response_id`` continues a stored
conversation.  Fields that would change the answer and are not implemented are refused
with a 400 naming them.
"""
from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from llmctl.common.errors import BadRequest, NotFound
from llmctl.common.request import GenRequest, validate
from llmctl.dataplane.http.base import GATEWAY_KEY, read_body
from llmctl.dataplane.http.exchange import exchange, utility
from llmctl.dataplane.http.openai_shapes import dumps
from llmctl.dataplane.http.response_store import FILE, ResponseStore
from llmctl.dataplane.http.responses_shapes import ResponsesDialect
from llmctl.dataplane.http.tool_calls import (CHOICES, ToolMode, arguments, assistant,
                                              check_result_id, check_tools, make_mode, offer,
                                              tool)

STORE_KEY: web.AppKey[list[ResponseStore]] = web.AppKey("responses.store")  # opened lazily
_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
_UNSUPPORTED = ("background", "conversation", "prompt", "top_logprobs")
# Tools this server cannot offer and leaves out of the offer, as a model without them
# would: hosted search (it has no web access) and namespaces of sub-agent tools (Codex
# CLI's multi_agent_v1, whose calls it routes by namespace).
_NOT_OFFERED = ("web_search", "web_search_preview", "namespace")
_ECHOED = ("instructions", "max_output_tokens", "parallel_tool_calls",
           "previous_response_id", "temperature", "top_p", "tool_choice", "tools",
           "text", "store", "metadata", "truncation")


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of parts", param="input")
    texts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in _TEXT_PARTS \
                or not isinstance(p.get("text"), str):
            raise BadRequest(f"{where}[{j}]: only text parts are supported", param="input")
        texts.append(p["text"])
    return "\n".join(texts)


def items_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items."""
    inp = body.get("input")
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp or not all(isinstance(i, dict) for i in inp):
        raise BadRequest("input must be a string or a non-empty list of items", param="input")
    return inp


def messages_of(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation's items as messages for the chat template."""
    out: list[dict[str, Any]] = []
    ids: set[str] = set()
    calls: list[tuple[str, Any]] = []          # the assistant turn's calls, so far
    text = ""                                  # and its text

    def flush() -> None:
        nonlocal calls, text
        if calls or text:
            out.append(assistant(text, calls))
        calls, text = [], ""

    for i, it in enumerate(items):
        kind, where = it.get("type", "message"), f"input[{i}]"
        if kind == "function_call":
            if not isinstance(it.get("call_id"), str) or not isinstance(it.get("name"), str):
                raise BadRequest(f"{where}: a function_call needs a call_id and a name",
                                 param="input")
            ids.add(it["call_id"])
            calls.append((it["name"], arguments(it.get("arguments", "{}"), where, "input")))
            continue
        if kind == "message" and it.get("role") == "assistant" and not calls:
            flush()
            text = _content(it.get("content"), f"{where}.content")
            continue
        flush()
        if kind == "message":
            role = it.get("role")
            if role not in _ROLES:
                raise BadRequest(f"{where}.role must be one of {', '.join(_ROLES)}",
                                 param="input")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _content(it.get("content"), f"{where}.content")})
        elif kind == "function_call_output":
            check_result_id(it.get("call_id"), ids, f"{where}.call_id", "input")
            result = it.get("output")
            out.append({"role": "tool", "content": result if isinstance(result, str)
                        else _content(result, f"{where}.output")})
        elif kind != "reasoning":
            raise BadRequest(f"{where}: items of type {kind!r} are not supported",
                             param="input")
    flush()
    return out


def _tool_mode(body: dict[str, Any]) -> ToolMode | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise BadRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise BadRequest('tool_choice must be "none", "auto", "required" or '
                             '{"type": "function", "name": ...}', param="tool_choice")
        choice = choice["name"]
    elif choice is not None and choice not in CHOICES:
        raise BadRequest('tool_choice must be "none", "auto", "required" or a function',
                         param="tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", param="tools")
    specs = []
    for i, t in enumerate(tools):
        if isinstance(t, dict) and t.get("type") in _NOT_OFFERED:
            continue
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise BadRequest(f"tools[{i}]: tools of type {kind!r} are not supported "
                             f"(only function tools)", param="tools")
        specs.append(tool(t.get("name"), t.get("description"), t.get("parameters"),
                          f"tools[{i}]", "tools"))
    if not specs:
        if choice in (None, "none", "auto"):
            return None
        raise BadRequest("tool_choice needs function tools", param="tool_choice")
    return make_mode(check_tools(specs, "tools"), choice or "auto", ptc is not False)


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BadRequest("text.format must be an object", param="text")
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    return fmt


def to_request(body: dict[str, Any], gen: Any, chain: list[dict[str, Any]],
               counting: bool = False) -> tuple[GenRequest, bool, ToolMode | None,
                                                list[dict[str, Any]]]:
    """(the request, stream?, tool calling, the conversation's items) of a Responses
    body continuing ``chain`` (a stored conversation's items, or [])."""
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0):
            raise BadRequest(f"{key} is not supported", param=key)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    items = chain + items_of(body)
    messages = messages_of(items)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("instructions must be a string", param="instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    mode = _tool_mode(body)
    rf = _response_format(body)
    if mode is not None and rf is not None and rf.get("type") != "text":
        raise BadRequest("tools cannot be combined with a JSON text.format", param="text")
    obj = {"messages": offer(messages, mode), "response_format": rf,
           "max_tokens": 1 if counting else body.get("max_output_tokens"),
           **{k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "model",
                                       "priority")}}
    request = validate(obj, gen)
    if mode is not None:
        request = msgspec.structs.replace(request, json_schema=mode.schema,
                                          or_text=mode.or_text)
    return request, bool(stream), mode, items


def _store(request: web.Request) -> ResponseStore:
    held = request.app[STORE_KEY]
    if not held:
        cfg = request.app[GATEWAY_KEY].cfg
        held.append(ResponseStore(cfg.run_dir / FILE, cfg.http.responses_max_bytes,
                                  cfg.http.responses_ttl_s))
    return held[0]


def _chain(request: web.Request, body: dict[str, Any]) -> list[dict[str, Any]]:
    prev = body.get("previous_response_id")
    if prev is None:
        return []
    if not isinstance(prev, str):
        raise BadRequest("previous_response_id must be a string", param="previous_response_id")
    items = _store(request).items(prev)
    if items is None:
        raise NotFound(f"previous response with id {prev!r} not found (not stored, "
                       f"expired or deleted)", param="previous_response_id")
    return items


async def create(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    body = await read_body(request)
    gen, stream, mode, items = to_request(body, gw.generation, _chain(request, body))
    sched = gw.route(gen.model, lenient=True)
    params = {k: body.get(k) for k in _ECHOED}
    params.update(store=body.get("store") is not False, tools=body.get("tools") or [],
                  tool_choice=body.get("tool_choice") or "auto",
                  parallel_tool_calls=body.get("parallel_tool_calls") is not False,
                  text=body.get("text") or {"format": {"type": "text"}},
                  metadata=body.get("metadata") or {})
    dialect = ResponsesDialect(sched.model, stream, mode, params)
    resp = await exchange(gw, request, gen, dialect, sched)
    if dialect.result is not None and params["store"] and gw.cfg.http.responses_max_bytes:
        _store(request).put(dialect.id, dialect.result, items + dialect.result["output"])
    return resp


async def get(request: web.Request) -> web.StreamResponse:
    rid = request.match_info["id"]
    found = _store(request).response(rid)
    if found is None:
        raise NotFound(f"no stored response with id {rid!r}")
    return web.json_response(found, dumps=dumps)


async def delete(request: web.Request) -> web.StreamResponse:
    rid = request.match_info["id"]
    if not _store(request).delete(rid):
        raise NotFound(f"no stored response with id {rid!r}")
    return web.json_response({"id": rid, "object": "response", "deleted": True}, dumps=dumps)


async def input_tokens(request: web.Request) -> web.StreamResponse:
    """The tokens the request's input would take, after the chat template."""
    gw = request.app[GATEWAY_KEY]
    body = await read_body(request)
    gen, _, _, _ = to_request(body, gw.generation, _chain(request, body), counting=True)
    sched = gw.route(gen.model, lenient=True)
    return await utility(gw, request, GenRequest(tokenize=True, messages=gen.messages,
                                                 model=gen.model),
                         lambda fin: {"object": "response.input_tokens",
                                      "input_tokens": fin.prompt_tokens}, sched)


async def _close_store(app: web.Application) -> None:
    for store in app[STORE_KEY]:
        store.close()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_post("/v1/responses/input_tokens", input_tokens)
    app.router.add_get("/v1/responses/{id}", get)
    app.router.add_delete("/v1/responses/{id}", delete)
    app[STORE_KEY] = []
    app.on_cleanup.append(_close_store)
