"""``POST /v1/embeddings``: the request's fields and the response (pure; the handler is
in ``http.py``).  The inputs travel to a worker as a GENERATE with ``embed`` (same
admission queue, credits and deadline as generation); the worker's DONE carries one
L2-normalised vector per input as base64 of little-endian float32 (``worker/embed.py``),
which is OpenAI's ``encoding_format: "base64"`` as it is, and decoded for ``"float"``.
"""
from __future__ import annotations

import base64
import struct
from typing import Any

from llmctl.common.errors import BadRequest
from llmctl.common.protocol import Defaults, GenerateRequest, is_text

MAX_INPUTS = 256


def _bad(message: str, param: str) -> BadRequest:
    err = BadRequest(message)
    err.param = param  # type: ignore[attr-defined]
    return err


def to_embed(body: dict[str, Any], d: Defaults) -> tuple[GenerateRequest, str]:
    """(the request for a worker, encoding_format) of an embeddings request body."""
    inp = body.get("input")
    inputs = [inp] if isinstance(inp, str) else inp
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
        raise _bad(f"input must be a string or a list of 1 to {MAX_INPUTS} strings", "input")
    for i, s in enumerate(inputs):
        if not isinstance(s, str):
            raise _bad(f"input[{i}] must be a string (token arrays are not supported)", "input")
        if not s:
            raise _bad(f"input[{i}] is empty", "input")
        if not is_text(s):
            raise _bad(f"input[{i}] is not valid Unicode text", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _bad('encoding_format must be "float" or "base64"', "encoding_format")
    if body.get("dimensions") is not None:
        raise _bad("dimensions is not supported: the model's full vectors are returned",
                   "dimensions")
    params = GenerateRequest(prompt=None, messages=None, max_tokens=1, temperature=0.0,
                             top_p=1.0, top_k=0, seed=None, stop=(),
                             deadline_ms=d.deadline_ms, embed=tuple(inputs))
    return params, fmt


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def response(stats: dict[str, Any], fmt: str, model: str) -> dict[str, Any]:
    vectors = stats.get("embeddings") or []
    p = int(stats.get("prompt_tokens", 0))
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": v if fmt == "base64" else floats(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": p, "total_tokens": p}}
