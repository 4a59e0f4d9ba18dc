"""llama-server's own HTTP API (its ``tools/server/README.md``): ``POST /completion``
(and ``/completions``), ``/tokenize``, ``/detokenize``, ``/apply-template``,
``/embedding(s)``, ``/v1/chat/completions/input_tokens``, ``GET /props``, ``/slots``,
``/models`` with ``POST /models/load`` and ``/models/unload``, and the OpenAI routes
without their ``/v1`` prefix.

Every request goes through the gateway as any other (``exchange``: tenants and their
keys, admission, deadlines, cancellation, metrics): completions on the stream core,
tokenize, detokenize and apply-template as the worker's utility requests (answered at
once, without a slot).  Errors on these paths are in llama-server's shape
(``llama_shapes.error_body``).
"""
from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from llmctl.common import admin
from llmctl.common.errors import BadRequest, LlmctlError, ModelNotFound
from llmctl.common.messages import Finished
from llmctl.common.request import GenRequest, seed_field, validate
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.http import embeddings, openai
from llmctl.dataplane.http.base import GATEWAY_KEY, read_body
from llmctl.dataplane.http.exchange import Collected, exchange
from llmctl.dataplane.http.llama_shapes import (error_body, prompt_parts, sampling_fields,
                                                settings, timings)
from llmctl.dataplane.http.openai_shapes import dumps


def _event(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode("utf-8")


def completion_request(body: dict[str, Any], gw: Gateway) -> tuple[GenRequest, dict[str, Any]]:
    """The GenRequest of a ``/completion`` body, and the options of its answer."""
    parts = prompt_parts(body.get("prompt"))
    obj = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "stop", "grammar",
                                    "json_schema", "model", "deadline_ms", "priority")}
    schema = obj.pop("json_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise BadRequest("json_schema must be an object (a JSON schema)", param="json_schema")
        obj["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
    if body.get("seed") not in (None, -1):
        obj["seed"] = body.get("seed")
    seed_field(obj)
    obj["max_tokens"] = openai.n_predict(body, None)
    obj["prompt"] = ""
    gen = validate(obj, gw.generation)
    n_probs = body.get("n_probs", 0)
    if isinstance(n_probs, bool) or not isinstance(n_probs, int) or not 0 <= n_probs <= 20:
        raise BadRequest("n_probs must be an integer in [0, 20]", param="n_probs")
    opts = {}
    for key in ("stream", "return_tokens", "timings_per_token"):
        v = body.get(key, False)
        if not isinstance(v, bool):
            raise BadRequest(f"{key} must be a boolean", param=key)
        opts[key] = v
    opts["n_probs"] = n_probs
    ids = n_probs > 0 or opts["return_tokens"] or opts["stream"]
    gen = msgspec.structs.replace(gen, prompt=None, prompt_parts=parts, logprobs=ids,
                                  top_logprobs=n_probs, token_ids=ids, **sampling_fields(body))
    opts["prompt"] = "".join(p for p in parts if isinstance(p, str))
    return gen, opts


class CompletionDialect:
    """``/completion``'s answer (``exchange.Dialect``): one JSON object, or one SSE event
    a piece of text and a last one with ``stop: true``."""

    def __init__(self, gen: GenRequest, opts: dict[str, Any], model: str, n_ctx: int) -> None:
        self.gen, self.opts, self.model, self.n_ctx = gen, opts, model, n_ctx
        self.streaming = opts["stream"]
        self.held: list[dict[str, Any]] = []    # logprob entries of the next piece
        self.content: list[str] = []
        self.entries: list[dict[str, Any]] = []
        self.n = 0
        self.t0 = time.monotonic()
        self.t_first: float | None = None

    def head(self) -> bytes:
        return b""

    def logprobs(self, content: list[dict[str, Any]]) -> None:
        self.held.extend(content)

    def _take(self) -> list[dict[str, Any]]:
        held, self.held = self.held, []
        return held

    def _partial_timings(self) -> dict[str, Any]:
        now = time.monotonic()
        first = self.t_first or now
        g_ms = (now - first) * 1000
        return {"prompt_ms": (first - self.t0) * 1000, "predicted_n": self.n,
                "predicted_ms": g_ms,
                "predicted_per_second": 1000 * self.n / g_ms if g_ms else 0.0}

    def token(self, text: str) -> bytes | None:
        held = self._take()
        self.n += max(len(held), 1)
        if self.t_first is None:
            self.t_first = time.monotonic()
        if not self.streaming:
            self.content.append(text)
            self.entries += held
            return None
        ev: dict[str, Any] = {"index": 0, "content": text, "tokens": [e["id"] for e in held],
                              "stop": False, "id_slot": -1, "tokens_predicted": self.n,
                              "tokens_evaluated": 0}
        if self.opts["n_probs"]:
            ev["completion_probabilities"] = held
        if self.opts["timings_per_token"]:
            ev["timings"] = self._partial_timings()
        return _event(ev)

    def final(self, fin: Finished) -> dict[str, Any]:
        self.entries += self._take()
        content = "".join(self.content)
        stop_type = "limit" if fin.finish_reason == "length" \
            else "word" if fin.stop_word else "eos"
        out = {"index": 0, "content": "" if self.streaming else content,
               "tokens": [e["id"] for e in self.entries]
               if self.opts["return_tokens"] and not self.streaming else [],
               "id_slot": fin.slot, "stop": True, "model": self.model,
               "tokens_predicted": fin.completion_tokens,
               "tokens_evaluated": fin.prompt_tokens,
               "generation_settings": settings(self.gen, self.n_ctx, self.streaming,
                                               self.opts["n_probs"], self.model),
               "prompt": self.opts["prompt"], "has_new_line": "\n" in content,
               "truncated": False, "stop_type": stop_type,
               "stopping_word": fin.stop_word or "",
               "tokens_cached": fin.prompt_tokens + max(fin.completion_tokens - 1, 0),
               "timings": timings(fin)}
        if self.opts["n_probs"] and not self.streaming and self.entries:
            out["completion_probabilities"] = self.entries
        return out

    def done(self, fin: Finished) -> bytes:
        return _event(self.final(fin))

    def error(self, err: LlmctlError) -> bytes:
        return _event(error_body(err))

    def answer(self, fin: Finished) -> web.StreamResponse:
        return web.json_response(self.final(fin), dumps=dumps)


def _n_ctx(gw: Gateway, model: str | None) -> int:
    sched = gw.route(model, lenient=True)
    return next((w.n_ctx for w in sched.workers.values()), 0)


async def completion(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    gen, opts = completion_request(await read_body(request), gw)
    sched = gw.route(gen.model, lenient=True)
    dialect = CompletionDialect(gen, opts, sched.model, _n_ctx(gw, gen.model))
    return await exchange(gw, request, gen, dialect, sched)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be a boolean", param=key)
    return v


async def _utility(request: web.Request, gen: GenRequest, render: Any) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    gen = msgspec.structs.replace(gen, max_tokens=1, deadline_ms=gw.generation.deadline_ms)
    return await exchange(gw, request, gen, Collected(render), gw.route(gen.model, lenient=True))


async def tokenize(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    content = body.get("content")
    if not isinstance(content, str):
        raise BadRequest("content must be a string", param="content")
    with_pieces = _bool(body, "with_pieces", False)
    gen = GenRequest(prompt=content, tokenize=True, add_special=_bool(body, "add_special", False),
                     parse_special=_bool(body, "parse_special", True), with_pieces=with_pieces,
                     model=body.get("model") if isinstance(body.get("model"), str) else None)

    def render(fin: Finished) -> dict[str, Any]:
        tokens = fin.tokens or []
        if with_pieces:
            return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, fin.pieces or [])]}
        return {"tokens": tokens}
    return await _utility(request, gen, render)


async def detokenize(request: web.Request) -> web.StreamResponse:
    body = await read_body(request)
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in tokens):
        raise BadRequest("tokens must be a list of token ids", param="tokens")
    gen = GenRequest(detokenize=tuple(tokens))
    return await _utility(request, gen, lambda fin: {"content": fin.text or ""})


def _chat(body: dict[str, Any], gw: Gateway) -> GenRequest:
    """A chat body's messages (and template variables) as a tokenize request."""
    req, _, _, _ = openai.to_request({"messages": body.get("messages"), "model": body.get("model"),
                                      "tools": body.get("tools"),
                                      "tool_choice": body.get("tool_choice"),
                                      "chat_template_kwargs": body.get("chat_template_kwargs")},
                                     gw.generation, chat=True)
    return msgspec.structs.replace(req, tokenize=True, json_schema=None, or_text=False)


async def apply_template(request: web.Request) -> web.StreamResponse:
    gen = _chat(await read_body(request), request.app[GATEWAY_KEY])
    return await _utility(request, gen, lambda fin: {"prompt": fin.text or ""})


async def input_tokens(request: web.Request) -> web.StreamResponse:
    gen = _chat(await read_body(request), request.app[GATEWAY_KEY])
    return await _utility(request, gen, lambda fin: {"object": "response.input_tokens",
                                                     "input_tokens": fin.prompt_tokens})


async def embedding(request: web.Request) -> web.StreamResponse:
    """llama-server's own embeddings: ``[{"index", "embedding": [[...]]}]``."""
    body = await read_body(request)
    if "input" not in body and "content" in body:
        body["input"] = body["content"]
    gw = request.app[GATEWAY_KEY]
    gen, _ = embeddings.to_embed(body, gw.generation)
    return await exchange(gw, request, gen, Collected(lambda fin: [
        {"index": i, "embedding": [embeddings.floats(v)]}
        for i, v in enumerate(fin.embeddings or [])]))


def _slots(gw: Gateway) -> list[dict[str, Any]]:
    """Every worker's slots (the default model's first): id, n_ctx, whether it runs a
    request, the tokens its KV holds (as the worker last reported)."""
    out: list[dict[str, Any]] = []
    for sched in gw.sched:
        for w in sched.workers.values():
            busy = len(w.inflight)
            for i in range(w.slots):
                cached = w.slot_tokens[i] if i < len(w.slot_tokens) else 0
                out.append({"id": len(out), "id_slot": i, "worker": w.name,
                            "model": sched.model, "id_task": -1, "n_ctx": w.n_ctx,
                            "speculative": False, "is_processing": i < busy,
                            "state": "processing" if i < busy else "idle",
                            "n_prompt_tokens": cached, "n_cached_tokens": cached})
    return out


async def slots(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    out = _slots(gw)
    if request.query.get("fail_on_no_slot") == "1" and all(s["is_processing"] for s in out):
        return web.json_response({"error": {"code": 503, "message": "no slot available",
                                            "type": "unavailable_error"}}, status=503)
    return web.json_response(out, dumps=dumps)


async def props(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = request.query.get("model")
    sched = gw.route(name, lenient=True)
    w = next(iter(sched.workers.values()), None)
    p = w.props if w is not None else {}
    n_ctx = w.n_ctx if w is not None else 0
    default = GenRequest(max_tokens=gw.generation.max_tokens,
                         temperature=gw.generation.temperature,
                         top_p=gw.generation.top_p, top_k=gw.generation.top_k)
    return web.json_response({
        "default_generation_settings": {
            "id": 0, "id_task": -1, "n_ctx": n_ctx, "speculative": False,
            "is_processing": False, "prompt": "",
            "params": settings(default, n_ctx, False, 0, sched.model)},
        "total_slots": sum(x.slots for x in sched.workers.values()),
        "model_alias": sched.model, "model_path": p.get("model_path", ""),
        "modalities": {"vision": False, "video": False, "audio": False},
        "endpoint_slots": True, "endpoint_props": False,
        "endpoint_metrics": True,
        "chat_template": p.get("chat_template", ""), "chat_template_caps": {},
        "bos_token": p.get("bos_token", ""), "eos_token": p.get("eos_token", ""),
        "build_info": "llmctl", "is_sleeping": False}, dumps=dumps)


def _status(gw: Gateway, name: str) -> str:
    sched = gw.sched.get(name)
    return gw.procs.get("models", {}).get(name, {}).get("state") \
        or ("loaded" if sched is not None and sched.ready else "unloaded")


async def models(request: web.Request) -> web.Response:
    """OpenAI's model list with llama-server's router fields (``status``, ``meta``)."""
    gw = request.app[GATEWAY_KEY]
    data = []
    for sched in gw.sched:
        w = next(iter(sched.workers.values()), None)
        p = w.props if w is not None else {}
        data.append({"id": sched.model, "object": "model", "created": int(gw.started),
                     "owned_by": "llmctl", "path": p.get("model_path", ""),
                     "status": {"value": _status(gw, sched.model)},
                     "meta": {"n_ctx": w.n_ctx if w is not None else 0,
                              **{k: p[k] for k in ("n_vocab", "n_ctx_train", "n_embd",
                                                   "n_params", "size") if k in p}}})
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


async def _model_of(request: web.Request) -> str:
    gw = request.app[GATEWAY_KEY]
    name = (await read_body(request)).get("model")
    if not isinstance(name, str) or gw.sched.get(name) is None:
        raise ModelNotFound(f"the model {name!r} does not exist")
    return name


async def models_load(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = await _model_of(request)
    if not gw.sched.get(name).ready:        # type: ignore[union-attr]
        gw.events.put_nowait(admin.ModelWanted(model=name))
    return web.json_response({"success": True})


async def models_unload(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = await _model_of(request)
    gw.events.put_nowait(admin.ModelUnwanted(model=name))
    return web.json_response({"success": True})


def health_error(err: LlmctlError, loading: bool) -> dict[str, Any]:
    """The body of a 503 from ``/health``: llmctl's status and llama-server's error."""
    return {"status": err.code.value, "reason": err.message,
            "error": {"code": 503, "message": "Loading model" if loading else err.message,
                      "type": "unavailable_error"}}


def add_routes(app: web.Application) -> None:
    for path in ("/completion", "/completions"):
        app.router.add_post(path, completion)
    app.router.add_post("/chat/completions", openai.chat_completions)
    for path in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"):
        app.router.add_post(path, input_tokens)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/apply-template", apply_template)
    for path in ("/embedding", "/embeddings"):
        app.router.add_post(path, embedding)
    app.router.add_get("/props", props)
    app.router.add_get("/slots", slots)
    app.router.add_get("/models", models)
    app.router.add_post("/models/load", models_load)
    app.router.add_post("/models/unload", models_unload)

