"""``POST /v1/embeddings``: OpenAI's embeddings API.  The inputs travel to a worker as a GENERATE with ``embed`` (same
admission queue, credits and deadline as generation); the worker's DONE carries one
L2-normalised vector per input as base64 of little-endian float32 (``worker/embed.py``),
which is OpenAI's ``encoding_format: "base64"`` as it is, and decoded for ``"float"``.
"""
from __future__ import annotations

import base64
import struct
from typing import Any

from aiohttp import web

from llmctl.common.config import GenerationConfig
from llmctl.common.errors import BadRequest
from llmctl.common.messages import Finished
from llmctl.common.request import GenRequest, is_text
from llmctl.dataplane.http.exchange import Collected, exchange
from llmctl.dataplane.http.base import GATEWAY_KEY, read_body

MAX_INPUTS = 256


def to_embed(body: dict[str, Any], gen: GenerationConfig) -> tuple[GenRequest, str]:
    """(the request for a worker, encoding_format) of an embeddings request body."""
    inp = body.get("input")
    inputs = [inp] if isinstance(inp, str) else inp
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
        raise BadRequest(f"input must be a string or a list of 1 to {MAX_INPUTS} strings", param="input")
    for i, s in enumerate(inputs):
        if not isinstance(s, str):
            raise BadRequest(f"input[{i}] must be a string (token arrays are not supported)", param="input")
        if not s:
            raise BadRequest(f"input[{i}] is empty", param="input")
        if not is_text(s):
            raise BadRequest(f"input[{i}] is not valid Unicode text", param="input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest('encoding_format must be "float" or "base64"', param="encoding_format")
    if body.get("dimensions") is not None:
        raise BadRequest("dimensions is not supported: the model's full vectors are returned", param="dimensions")
    return GenRequest(max_tokens=1, deadline_ms=gen.deadline_ms, embed=tuple(inputs)), fmt


def floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def response(fin: Finished, fmt: str, model: str) -> dict[str, Any]:
    vectors = fin.embeddings or []
    p = fin.prompt_tokens
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i,
                      "embedding": v if fmt == "base64" else floats(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": p, "total_tokens": p}}


async def embeddings(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    gen, fmt = to_embed(await read_body(request), gw.generation)
    return await exchange(gw, request, gen, Collected(lambda fin: response(fin, fmt, gw.model_name)))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
