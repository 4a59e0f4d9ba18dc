"""llama-server's request fields and response shapes (its ``tools/server/README.md``),
shared by its native API (``llama_server.py``) and the OpenAI front (``openai.py``),
which reads llama-server's extensions to OpenAI's fields as llama-server does: the
forms of ``/completion``'s ``prompt``, ``generation_settings``, ``timings``, the error
shape.

``sampling_fields`` turns the fields llmctl implements (``logit_bias``, ``min_p``,
``samplers``, ``cache_prompt``, ``id_slot``, ``chat_template_kwargs``) into GenRequest
fields and refuses with a 400 naming it any field that would change the answer and
that llmctl does not implement; a field at its no-op value is accepted.
"""
from __future__ import annotations

from typing import Any

from llmctl.common.errors import BadRequest, LlmctlError
from llmctl.common.messages import Finished
from llmctl.common.request import GenRequest, MAX_OUTPUT

# Fields that change the answer, with the value that leaves it unchanged.
NOOP: dict[str, Any] = {
    "typical_p": 1.0, "dynatemp_range": 0.0, "xtc_probability": 0.0, "dry_multiplier": 0.0,
    "mirostat": 0, "top_n_sigma": -1.0, "n_indent": 0, "t_max_predict_ms": 0,
    "ignore_eos": False, "post_sampling_probs": False, "n_cmpl": 1, "lora": [],
    "return_progress": False, "response_fields": [],
}
# Samplers of llama-server's chain: those llmctl runs, and those that are no-ops with
# their parameters at the NOOP values.
SAMPLERS = ("penalties", "top_k", "top_p", "min_p", "temperature")
NOOP_SAMPLERS = ("dry", "typ_p", "typical_p", "xtc", "top_n_sigma")
PENALTIES = (("repeat_last_n", 64, -1, 1 << 20), ("repeat_penalty", 1.0, 0.0, 10.0),
             ("frequency_penalty", 0.0, -2.0, 2.0), ("presence_penalty", 0.0, -2.0, 2.0))
LLAMA_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "unavailable_error", 501: "not_supported_error", 503: "unavailable_error"}


def refuse_unsupported(body: dict[str, Any]) -> None:
    for key, noop in NOOP.items():
        v = body.get(key)
        if v is not None and v != noop and not (noop == -1.0 and isinstance(v, (int, float))
                                                and v <= 0):
            raise BadRequest(f"{key} is not supported (only {noop!r})", param=key)


def _bias(v: Any, key: Any) -> float | None:
    if v is False:
        return None                  # never sampled
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"logit_bias[{key!r}]: a bias is a number or false", param="logit_bias")
    return float(v)


def _token(k: Any) -> int | str:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise BadRequest("logit_bias: a token is an id or a text", param="logit_bias")
    if isinstance(k, str) and k.lstrip("-").isdigit():
        return int(k)                # OpenAI's {"token id": bias}
    return k


def logit_bias(v: Any) -> tuple[tuple[int | str, float | None], ...]:
    """llama-server's ``logit_bias``: ``[[token or text, bias or false], ...]`` or
    ``{"token id or text": bias}``."""
    if v is None:
        return ()
    if isinstance(v, dict):
        return tuple((_token(k), _bias(b, k)) for k, b in v.items())
    if not isinstance(v, list):
        raise BadRequest("logit_bias must be a list of [token, bias] or an object",
                         param="logit_bias")
    out = []
    for e in v:
        if not isinstance(e, list) or len(e) != 2:
            raise BadRequest("logit_bias entries are [token, bias] pairs", param="logit_bias")
        out.append((_token(e[0]), _bias(e[1], e[0])))
    return tuple(out)


def samplers(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [{"k": "top_k", "p": "top_p", "m": "min_p", "t": "temperature"}.get(c, c)
             for c in v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise BadRequest("samplers must be a list of sampler names", param="samplers")
    for s in v:
        if s not in SAMPLERS and s not in NOOP_SAMPLERS:
            raise BadRequest(f"samplers: {s!r} is not supported (only {', '.join(SAMPLERS)})",
                             param="samplers")
    return tuple(s for s in v if s in SAMPLERS)


def _int(body: dict[str, Any], key: str, default: int, lo: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise BadRequest(f"{key} must be an integer >= {lo}", param=key)
    return v


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The GenRequest fields of llama-server's extensions in ``body``."""
    refuse_unsupported(body)
    out: dict[str, Any] = {"logit_bias": logit_bias(body.get("logit_bias")),
                           "samplers": samplers(body.get("samplers")),
                           "id_slot": _int(body, "id_slot", -1, -1)}
    min_p = body.get("min_p")
    if min_p is not None:
        if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) \
                or not 0 <= min_p <= 1:
            raise BadRequest("min_p must be a number in [0, 1]", param="min_p")
        out["min_p"] = float(min_p)
    for key in ("cache_prompt",):
        v = body.get(key)
        if v is not None and not isinstance(v, bool):
            raise BadRequest(f"{key} must be a boolean", param=key)
        if v is not None:
            out[key] = v
    pen = []
    for key, noop, lo, hi in PENALTIES:
        v = body.get(key)
        v = noop if v is None else v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise BadRequest(f"{key} must be a number in [{lo}, {hi}]", param=key)
        pen.append(int(v) if key == "repeat_last_n" else float(v))
    if pen[1:] != [1.0, 0.0, 0.0] and pen[0] != 0:
        out["penalties"] = (pen[0] if pen[0] > 0 else 1 << 16, *pen[1:])   # -1: all tokens
    kw = body.get("chat_template_kwargs")
    if kw is not None:
        if not isinstance(kw, dict):
            raise BadRequest("chat_template_kwargs must be an object",
                             param="chat_template_kwargs")
        out["template_kwargs"] = kw or None
    return out


def timings(fin: Finished) -> dict[str, Any]:
    """llama-server's ``timings`` of a finished request: the worker's prefill and decode
    times (from its slot's start) and token counts."""
    cached = fin.cached_tokens or 0
    p_n, p_ms = max(fin.prompt_tokens - cached, 0), fin.prefill_ms or 0.0
    g_n, g_ms = fin.completion_tokens, fin.decode_ms or 0.0
    return {"cache_n": cached, "prompt_n": p_n, "prompt_ms": p_ms,
            "prompt_per_token_ms": p_ms / p_n if p_n else 0.0,
            "prompt_per_second": 1000.0 * p_n / p_ms if p_ms else 0.0,
            "predicted_n": g_n, "predicted_ms": g_ms,
            "predicted_per_token_ms": g_ms / g_n if g_n else 0.0,
            "predicted_per_second": 1000.0 * g_n / g_ms if g_ms else 0.0}


def error_body(err: LlmctlError) -> dict[str, Any]:
    """llama-server's error shape: ``{"error": {"code": status, "message", "type"}}``."""
    status = err.http_status
    return {"error": {"code": status, "message": err.message,
                      "type": LLAMA_TYPES.get(status, "invalid_request_error" if status < 500
                                              else "server_error")}}


def prompt_parts(v: Any) -> tuple[int | str, ...]:
    """llama-server's ``prompt``: a string, token ids, or ids and strings mixed."""
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and v and all(isinstance(p, (int, str)) and not isinstance(p, bool)
                                         for p in v):
        if all(isinstance(p, str) for p in v):
            if len(v) == 1:
                return (v[0],)
            raise BadRequest("several prompts in one request are not supported: send one "
                             "request per prompt", param="prompt")
        return tuple(v)
    raise BadRequest("prompt must be a string, token ids, or token ids and strings",
                     param="prompt")


def settings(gen: GenRequest, n_ctx: int, stream: bool, n_probs: int,
             model: str) -> dict[str, Any]:
    """llama-server's ``generation_settings`` of a request."""
    n_predict = -1 if gen.max_tokens >= MAX_OUTPUT else gen.max_tokens
    pen = gen.penalties or (64, 1.0, 0.0, 0.0)
    return {"n_ctx": n_ctx, "model": model,
            "seed": 0xFFFFFFFF if gen.seed is None else gen.seed,
            "temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p,
            "min_p": gen.min_p, "typical_p": 1.0, "repeat_last_n": pen[0],
            "repeat_penalty": pen[1], "frequency_penalty": pen[2], "presence_penalty": pen[3],
            "mirostat": 0,
            "stop": list(gen.stop), "max_tokens": n_predict, "n_predict": n_predict,
            "n_keep": 0, "ignore_eos": False, "stream": stream, "n_probs": n_probs,
            "logit_bias": [[t, False if b is None else b] for t, b in gen.logit_bias],
            "grammar": gen.grammar or "", "cache_prompt": gen.cache_prompt,
            "samplers": list(gen.samplers) if gen.samplers is not None
            else list(SAMPLERS),
            "id_slot": gen.id_slot}
