"""Structured output and logprobs fields of a request, validated at the gateway (pure).

A request may constrain its output in one of two ways (never both):

* ``response_format``: OpenAI's ``{"type": "text"}`` (no constraint),
  ``{"type": "json_object"}`` (any JSON object) or
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
* ``grammar``: a GBNF grammar (llama.cpp's format, root rule ``root``), an extension.

The gateway checks the shapes and sizes here; it does not load llama.cpp, so it does
not convert a schema or compile a grammar.  The worker does both in ``prepare()``
(``worker/constrain.py``), before the request takes a slot: a schema the converter
refuses or a grammar llama.cpp cannot parse is a ``bad_request`` naming the problem.
What travels to the worker is ``grammar`` (GBNF text) or ``json_schema`` (the schema as
canonical JSON text).

Logprobs: ``logprobs`` (a boolean) and ``top_logprobs`` (0..20) as in OpenAI's chat API.
"""
from __future__ import annotations

import json
from typing import Any

from llmctl.common.errors import BadRequest

MAX_GRAMMAR = 64 * 1024          # characters of GBNF or of a schema's JSON text
MAX_TOP_LOGPROBS = 20
ANY_OBJECT = {"type": "object"}  # json_object: the converter's generic JSON object


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=False)


def schema_text(schema: Any, where: str) -> str:
    """A JSON schema as the text the worker converts; shape and size checked."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{where} must be a JSON object (a JSON schema)")
    text = _dumps(schema)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} is not valid Unicode text (a lone surrogate escape?)") \
            from None
    if len(text) > MAX_GRAMMAR:
        raise BadRequest(f"{where} is {len(text)} characters; at most {MAX_GRAMMAR}")
    return text


def constraint(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """(grammar, json_schema text) of a request's ``response_format`` / ``grammar``."""
    grammar = obj.get("grammar")
    rf = obj.get("response_format")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise BadRequest("grammar must be a non-empty string (GBNF)")
        if len(grammar) > MAX_GRAMMAR:
            raise BadRequest(f"grammar is {len(grammar)} characters; at most {MAX_GRAMMAR}")
        try:
            grammar.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("grammar is not valid Unicode text") from None
    if rf is None:
        return grammar, None
    if not isinstance(rf, dict):
        raise BadRequest("response_format must be an object")
    kind = rf.get("type")
    if kind == "text":
        return grammar, None
    if grammar is not None:
        raise BadRequest("give either grammar or a JSON response_format, not both")
    if kind == "json_object":
        # llama-server and vLLM accept a schema here too; so do we.
        schema = rf.get("schema")
        return None, schema_text(ANY_OBJECT if schema is None else schema,
                                 "response_format.schema")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise BadRequest("response_format.json_schema must be an object with a 'schema'")
        schema = js.get("schema")
        if schema is None:
            raise BadRequest("response_format.json_schema.schema is required")
        return None, schema_text(schema, "response_format.json_schema.schema")
    raise BadRequest(f"response_format.type must be text, json_object or json_schema, "
                     f"got {kind!r}")


def logprobs_fields(obj: dict[str, Any]) -> tuple[bool, int]:
    """(logprobs?, top_logprobs) of a request (OpenAI chat semantics)."""
    lp, top = obj.get("logprobs"), obj.get("top_logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise BadRequest("logprobs must be a boolean")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) \
                or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not lp:
            raise BadRequest("top_logprobs needs logprobs: true")
    return bool(lp), int(top or 0)
