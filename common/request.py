"""The one request type: what every front makes of its wire format, and what a worker runs.

A front (the binary protocol, the OpenAI API, ...) turns its request into a ``GenRequest``
with ``validate`` (or builds one after checks of its own), with the server's generation
defaults (``[generation]``) filled in for whatever the client left out; the gateway admits
it, routes it on ``model`` and times it by ``deadline_ms``; the worker receives the same
struct (msgspec JSON) and runs it.  Nothing is copied into another request type on the way.

Structured output: a request may constrain its output in one of two ways (never both):
OpenAI's ``response_format`` (``{"type": "text"}``: no constraint; ``{"type":
"json_object"}``: any JSON object; ``{"type": "json_schema", "json_schema": {"name": ...,
"schema": {...}}}``) or ``grammar``, a GBNF grammar (llama.cpp's format, root rule
``root``).  The gateway checks their shapes and sizes here; it does not load llama.cpp, so
the worker converts a schema and compiles a grammar (``worker/constrain.py``) before the
request takes a slot, and a schema or grammar llama.cpp refuses is a ``bad_request``
naming the problem.  What travels is ``grammar`` (GBNF text) or ``json_schema`` (the
schema as canonical JSON text).  Logprobs: ``logprobs`` (a boolean) and ``top_logprobs``
(0..20) as in OpenAI's chat API.
"""
from __future__ import annotations

import json
from typing import Any

import msgspec

from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest, LlmctlError

MAX_STOP = 16
MAX_MESSAGES = 4096
MAX_OUTPUT = 1 << 20        # max_tokens' upper bound (the worker caps it at the context)
MAX_PRIORITY = 1000         # priority is in [-MAX_PRIORITY, MAX_PRIORITY], 0 by default
MAX_GRAMMAR = 64 * 1024          # characters of GBNF or of a schema's JSON text
MAX_TOP_LOGPROBS = 20
ANY_OBJECT = {"type": "object"}  # json_object: the converter's generic JSON object


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class GenRequest(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=False):
    """A validated request with every generation setting resolved."""
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    deadline_ms: int = 60_000       # the gateway's: admission to the end
    model: str | None = None        # the served model; None = the default (first) one
    grammar: str | None = None      # GBNF: output constrained by llama.cpp's grammar sampler
    json_schema: str | None = None  # a JSON schema (text), converted to GBNF by the worker
    or_text: bool = False           # json_schema's JSON, or else free text not starting
                                    # with "{" (tool_choice "auto")
    logprobs: bool = False          # LOGPROBS records before the TOKENs they describe
    top_logprobs: int = 0
    embed: tuple[str, ...] | None = None   # embed these texts instead of generating
    tokenize: bool = False          # instead of generating: the prompt's tokens (a chat's
                                    # after the model's template) and the text tokenized
    add_special: bool = True        # tokenize: a prompt gets the model's BOS
    with_pieces: bool = False       # tokenize: each token's piece too
    parse_special: bool = False     # tokenize: special tokens' texts are those tokens
    detokenize: tuple[int, ...] | None = None   # instead of generating: these tokens' text
    priority: int = 0               # lower runs first among a tenant's waiting work
                                    # (vLLM's convention; [scheduling] policy "fair")
    speculative: bool = True        # the model's speculation (if it has one) drafts
                                    # for this request; false: one token a step
    window: int = 0                 # TOKEN messages the worker may send ahead (the
                                    # gateway sets it at dispatch); 0 = unbounded
    prompt_parts: tuple[int | str, ...] | None = None  # instead of prompt: token ids and
                                    # texts, concatenated (a BOS first if a text is first)
    logit_bias: tuple[tuple[int | str, float | None], ...] = ()  # (token id, or a text:
                                    # each of its tokens; bias, None = never sampled)
    min_p: float = 0.0
    penalties: tuple[int, float, float, float] | None = None  # (last_n, repeat, frequency,
                                    # presence): llama.cpp's penalties over the last tokens
    samplers: tuple[str, ...] | None = None   # the sampler chain's order (penalties, top_k,
                                    # top_p, min_p, temperature); None = that order
    token_ids: bool = False         # logprob entries with token ids, one per token
    cache_prompt: bool = True       # False: the prompt is evaluated whole, no cache reuse
    id_slot: int = -1               # the worker slot to run in when it is free (-1: any)
    template_kwargs: dict[str, Any] | None = None   # extra variables of the chat template


def as_request(obj: GenRequest | Any) -> GenRequest:
    """A GenRequest as it is, or one converted from plain fields (in-process drivers:
    the engine's load generator, tests); ``BadRequest`` if they do not fit."""
    if isinstance(obj, GenRequest):
        return obj
    try:
        return msgspec.convert(obj, GenRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"request fields: {exc}") from None


# ---- validation of a client's JSON object ---------------------------------------------

def is_text(s: str) -> bool:
    """Is ``s`` valid Unicode text?  JSON's ``\\ud800`` escapes decode to lone surrogates,
    which no UTF-8 encoder (the tokenizer's included) accepts."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_field(v: Any, name: str, error: type[LlmctlError] = BadRequest) -> str:
    """``v`` as a text field named ``name``: a string of valid Unicode, or ``error``."""
    if not isinstance(v, str):
        raise error(f"{name} must be a string")
    if not is_text(v):
        raise error(f"{name} is not valid Unicode text (a lone surrogate escape?)")
    return v


def int_field(obj: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{key} must be an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be in [{lo}, {hi}], got {v}")
    return v


def bool_field(obj: dict, key: str, default: bool) -> bool:
    v = obj.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be true or false")
    return v


def num_field(obj: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{key} must be a number")
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be in [{lo}, {hi}], got {v}")
    return float(v)


def messages_field(v: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(v, list) or not v:
        raise BadRequest("messages must be a non-empty list")
    if len(v) > MAX_MESSAGES:
        raise BadRequest(f"at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"messages[{i}].role must be a non-empty string")
        out.append(ChatMessage(text_field(role, f"messages[{i}].role"),
                               text_field(content, f"messages[{i}].content")))
    return tuple(out)


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > MAX_STOP:
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP} strings")
    if not all(isinstance(s, str) and s for s in v):
        raise BadRequest("stop entries must be non-empty strings")
    return tuple(text_field(s, f"stop[{i}]") for i, s in enumerate(v))


# ---- structured output and logprobs ---------------------------------------------------

def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=False)


def schema_text(schema: Any, where: str) -> str:
    """A JSON schema as the text the worker converts; shape and size checked."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{where} must be a JSON object (a JSON schema)")
    text = text_field(_dumps(schema), where)
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
        text_field(grammar, "grammar")
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


def seed_field(obj: dict[str, Any]) -> int | None:
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= 0xFFFFFFFF):
        raise BadRequest("seed must be an integer in [0, 4294967295]")
    return seed


def validate(obj: dict[str, Any], gen: GenerationConfig) -> GenRequest:
    """A request object (a GENERATE payload, or a front's fields in its names) as a
    GenRequest, ``gen``'s defaults filling in what it leaves out; ``BadRequest`` names
    the first field that is wrong."""
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt == has_messages:
        raise BadRequest("exactly one of prompt and messages is required")
    model = obj.get("model")
    if model is not None:
        model = text_field(model, "model")
    grammar, json_schema = constraint(obj)
    logprobs, top_logprobs = logprobs_fields(obj)
    return GenRequest(
        prompt=text_field(obj["prompt"], "prompt") if has_prompt else None,
        messages=messages_field(obj["messages"]) if has_messages else None,
        max_tokens=int_field(obj, "max_tokens", gen.max_tokens, 1, MAX_OUTPUT),
        temperature=num_field(obj, "temperature", gen.temperature, 0.0, 10.0),
        top_p=num_field(obj, "top_p", gen.top_p, 0.0, 1.0),
        top_k=int_field(obj, "top_k", gen.top_k, 0, 1 << 20),
        seed=seed_field(obj),
        stop=_stop(obj.get("stop")),
        deadline_ms=int_field(obj, "deadline_ms", gen.deadline_ms, 1, gen.max_deadline_ms),
        grammar=grammar, json_schema=json_schema, logprobs=logprobs,
        top_logprobs=top_logprobs, model=model or None,
        priority=int_field(obj, "priority", 0, -MAX_PRIORITY, MAX_PRIORITY),
        speculative=bool_field(obj, "speculative", True),
    )
