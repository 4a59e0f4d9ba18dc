"""What every HTTP dialect's handlers share: the gateway (``GATEWAY_KEY``), the request
body (read within ``[http] body_timeout_s``), and one middleware: the API key (routes
under ``/v1/``) and typed errors rendered with their status in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
from typing import Any

from aiohttp import web

from llmctl.common.errors import (BadRequest, BodyTimeout, Code, FrameTooLarge, InternalError,
                                  LlmctlError, ModelNotFound, Unauthorized, openai_type)
from llmctl.common.protocol import parse_json
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.http.openai_shapes import dumps

log = logging.getLogger(__name__)

API_KEY_ENV = "LLMCTL_API_KEY"
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


def api_key(cfg_key: str) -> str:
    """The required key: ``$LLMCTL_API_KEY`` if set and non-empty, else the config's."""
    return os.environ.get(API_KEY_ENV) or cfg_key


def error_body(err: LlmctlError) -> dict[str, Any]:
    param = err.param
    if isinstance(err, ModelNotFound):
        param = "model"
    return {"error": {"message": err.message, "type": openai_type(err.code),
                      "param": param, "code": err.openai_code or err.code.value}}


def error_headers(err: LlmctlError) -> dict[str, str]:
    if err.code is Code.OVERLOADED:
        ms = err.retry_after_ms if err.retry_after_ms is not None else 250
        return {"Retry-After": str(max(1, math.ceil(ms / 1000)))}
    if err.code is Code.UNAUTHORIZED:
        return {"WWW-Authenticate": "Bearer"}
    return {}


def error_response(err: LlmctlError) -> web.Response:
    return web.json_response(error_body(err), status=err.http_status,
                             headers=error_headers(err), dumps=dumps)


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


def bearer_matches(header: str, expected: bytes) -> bool:
    """Does an ``Authorization`` header carry ``Bearer <expected>``?  Compared in constant
    time; a header that is not text (odd bytes decode to surrogates) never matches."""
    scheme, _, token = header.partition(" ")
    try:
        given = token.strip().encode("utf-8")
    except UnicodeEncodeError:
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)


def middleware(key: str) -> Any:
    expected = key.encode()

    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if expected and request.path.startswith("/v1/") and not bearer_matches(
                    request.headers.get("Authorization", ""), expected):
                raise Unauthorized("missing or wrong API key (Authorization: Bearer KEY)")
            return await handler(request)
        except LlmctlError as err:
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            body = {"error": {"message": exc.reason, "param": None, "code": None,
                              "type": "invalid_request_error" if exc.status < 500
                              else "server_error"}}
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return web.json_response(body, status=exc.status, headers=headers, dumps=dumps)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(InternalError("internal error"))

    return errors_and_auth
