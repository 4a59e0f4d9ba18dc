"""The HTTP server of the data plane: aiohttp on the gateway's own event loop.

One application serves every HTTP dialect, a module each (``openai.py``,
``anthropic.py``, ``responses.py``, ``embeddings.py``), ``GET /health``,
``GET /v1/models`` and ``/v1/models/{id}``, ``/metrics`` (``prom.py``) and ``/`` (what
is served), through one middleware (``base.py``).
"""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from llmctl.common.errors import LlmctlError, ModelNotFound, NotReady, ShuttingDown
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.http import anthropic, embeddings, openai, responses
from llmctl.dataplane.http.anthropic_shapes import error_response as anthropic_error
from llmctl.dataplane.http.base import GATEWAY_KEY, middleware
from llmctl.dataplane.http.openai_shapes import dumps

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 1.0    # open responses get this long when the gateway stops


def _model_card(gw: Gateway, name: str) -> dict[str, Any]:
    """OpenAI's model object, with llmctl's ``state`` (loaded, loading, unloading,
    unloaded: the supervisor's view, or the gateway's own before it has one)."""
    sched = gw.sched.get(name)
    ready = sched is not None and sched.ready
    state = gw.procs.get("models", {}).get(name, {}).get("state") \
        or ("loaded" if ready else "unloaded")
    return {"id": name, "object": "model", "created": int(gw.started), "owned_by": "llmctl",
            "state": state}


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    return web.json_response({"object": "list",
                              "data": [_model_card(gw, s.model) for s in gw.sched]},
                             dumps=dumps)


async def model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    name = request.match_info["model"]
    if gw.sched.get(name) is None:
        raise ModelNotFound(f"the model {name!r} does not exist")
    return web.json_response(_model_card(gw, name), dumps=dumps)


async def health(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    sched = gw.sched
    err: LlmctlError | None = None
    if sched.draining:
        err = ShuttingDown("the server is draining for a stop")
    elif not sched.ready:
        err = NotReady("no worker is ready")
    if err is not None:
        return web.json_response({"status": err.code.value, "reason": err.message},
                                 status=err.http_status, dumps=dumps)
    ready = sum(1 for w in sched.workers.values() if not w.draining)
    return web.json_response({
        "status": "ok", "model": gw.model_name, "workers_ready": ready,
        "queue": len(sched.queue), "max_queue": sched.max_queue,
        "inflight": sched.inflight_count()}, dumps=dumps)


async def root(request: web.Request) -> web.Response:
    """``/``: what answers here (clients probe it, e.g. Claude Code's ``HEAD /``)."""
    return web.json_response({"service": "llmctl", "health": "/health",
                              "apis": ["/v1/chat/completions", "/v1/completions",
                                       "/v1/embeddings", "/v1/messages", "/v1/responses",
                                       "/v1/models"]}, dumps=dumps)


def build_app(gw: Gateway) -> web.Application:
    """The HTTP application with every dialect's routes; add routes (e.g. /metrics)
    before serving it.  Routes under /v1/ need the API key when one is set."""
    app = web.Application(middlewares=[middleware(((anthropic.PATH, anthropic_error),))],
                          client_max_size=gw.cfg.gateway.max_frame)
    app[GATEWAY_KEY] = gw
    openai.add_routes(app)
    anthropic.add_routes(app)
    responses.add_routes(app)
    embeddings.add_routes(app)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/", root)
    return app


async def serve_http(gw: Gateway, app: web.Application | None = None) -> web.AppRunner:
    """Listen on [http] host:port; the caller stops it with ``await runner.cleanup()``."""
    cfg = gw.cfg.http
    # handler_cancellation: a client that disconnects cancels its handler, whose
    # ``finally`` closes the stream (streaming or not).
    runner = web.AppRunner(app if app is not None else build_app(gw),
                           handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    if cfg.enabled:
        log.info("HTTP API listening on %s%s",
                 ", ".join(f"{a[0]}:{a[1]}" for a in runner.addresses),
                 " (API key required)" if gw.tenancy.keyed("http") else "")
    return runner
