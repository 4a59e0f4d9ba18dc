"""What every HTTP dialect's handlers share: the gateway (``GATEWAY_KEY``), the request
body (read within ``[http] body_timeout_s``), and one middleware: the API key (routes
under ``/v1/``) and typed errors rendered with their status in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Callable

from aiohttp import web

from llmctl.common.errors import (RETRY_CODES, BadRequest, BodyTimeout, Code, FrameTooLarge,
                                  InternalError, LlmctlError, ModelNotFound, Unauthorized,
                                  openai_type)
from llmctl.common.protocol import parse_json
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.http.llama_shapes import error_body as llama_error_body
from llmctl.dataplane.http.openai_shapes import dumps

log = logging.getLogger(__name__)

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
# the request's tenant, set by the middleware (a typed key where aiohttp has them)
TENANT_KEY: Any = web.RequestKey("tenant", str) if hasattr(web, "RequestKey") \
    else "llmctl.tenant"


def error_body(err: LlmctlError) -> dict[str, Any]:
    param = err.param
    if isinstance(err, ModelNotFound):
        param = "model"
    return {"error": {"message": err.message, "type": openai_type(err.code),
                      "param": param, "code": err.openai_code or err.code.value}}


def error_headers(err: LlmctlError) -> dict[str, str]:
    if err.code in RETRY_CODES:
        ms = err.retry_after_ms if err.retry_after_ms is not None else 250
        return {"Retry-After": str(max(1, math.ceil(ms / 1000)))}
    if err.code is Code.UNAUTHORIZED:
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(err: LlmctlError, llama: bool = False) -> web.Response:
    """``err`` in OpenAI's shape, or (``llama``: llama-server's paths, outside ``/v1/``)
    in llama-server's."""
    return web.json_response(llama_error_body(err) if llama else error_body(err),
                             status=err.http_status, headers=error_headers(err), dumps=dumps)


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, read within ``[http] body_timeout_s``."""
    timeout = request.app[GATEWAY_KEY].cfg.http.body_timeout_s
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:
        raise FrameTooLarge(f"request body over {request.client_max_size} bytes") from None
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g}s") from None
    return parse_json(raw, BadRequest)


def presented_key(request: web.Request) -> str | None:
    """The API key a request presents: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``
    (the header Anthropic's clients send)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


OPEN_PATHS = ("/", "/health", "/v1/health", "/metrics")     # served without a key


Renderer = Callable[[LlmctlError], web.Response]


def middleware(shapes: tuple[tuple[str, Renderer], ...] = ()) -> Any:
    """Authentication and errors for every route; an error on a path under one of
    ``shapes``' prefixes is rendered by its dialect (else in OpenAI's shape)."""

    def render(request: web.Request, err: LlmctlError) -> web.Response:
        for prefix, renderer in shapes:
            if request.path == prefix or request.path.startswith(prefix + "/"):
                return renderer(err)
        return error_response(err, llama=not request.path.startswith("/v1/"))

    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.path not in OPEN_PATHS:
                # Whose request it is ([[tenants]]): a known key, or the tenant "default"
                # (Unauthorized where a key is required and this one is not known).
                request[TENANT_KEY] = request.app[GATEWAY_KEY].tenancy.identify(
                    presented_key(request))
            return await handler(request)
        except LlmctlError as err:
            return render(request, err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if any(request.path.startswith(p) for p, _ in shapes):
                err = LlmctlError(exc.reason)
                err.status = exc.status
                return render(request, err)
            body = {"error": {"message": exc.reason, "param": None, "code": None,
                              "type": "invalid_request_error" if exc.status < 500
                              else "server_error"}}
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return web.json_response(body, status=exc.status, headers=headers, dumps=dumps)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return render(request, InternalError("internal error"))

    return errors_and_auth
