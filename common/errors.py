"""Typed errors of the data plane, mapped once to wire codes and HTTP statuses.

Code elsewhere raises or returns these; the fronts translate them with
``err.code`` (wire, PROTOCOL.md) and ``err.http_status`` (OpenAI front).  Nothing
matches on exception text.
"""
from __future__ import annotations

from enum import Enum


class Code(str, Enum):
    PROTOCOL = "protocol"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    TOO_MANY_STREAMS = "too_many_streams"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    NOT_READY = "not_ready"
    SHUTTING_DOWN = "shutting_down"
    TIMEOUT = "timeout"
    WORKER_FAILED = "worker_failed"
    SLOW_CLIENT = "slow_client"
    INTERNAL = "internal"


# code -> (HTTP status, OpenAI error type)
_TABLE: dict[Code, tuple[int, str]] = {
    Code.PROTOCOL: (400, "invalid_request_error"),
    Code.TOO_LARGE: (413, "invalid_request_error"),
    Code.UNAUTHORIZED: (401, "authentication_error"),
    Code.BAD_REQUEST: (400, "invalid_request_error"),
    Code.TOO_MANY_STREAMS: (429, "rate_limit_error"),
    Code.OVERLOADED: (429, "rate_limit_error"),
    Code.RATE_LIMITED: (429, "rate_limit_error"),
    Code.NOT_READY: (503, "service_unavailable"),
    Code.SHUTTING_DOWN: (503, "service_unavailable"),
    Code.TIMEOUT: (504, "timeout"),
    Code.WORKER_FAILED: (502, "server_error"),
    Code.SLOW_CLIENT: (408, "timeout"),
    Code.INTERNAL: (500, "server_error"),
}


RETRY_CODES = (Code.OVERLOADED, Code.RATE_LIMITED)   # answered with when to come back


def http_status(code: Code) -> int:
    return _TABLE[code][0]


def openai_type(code: Code) -> str:
    return _TABLE[code][1]


def _text(message: str) -> str:
    """A message that encodes as UTF-8 (a lone surrogate from a client's input, quoted in
    an exception, is written as its escape)."""
    try:
        message.encode("utf-8")
        return message
    except UnicodeEncodeError:
        return message.encode("utf-8", "backslashreplace").decode("utf-8")


class LlmctlError(Exception):
    """Base of every error that reaches a client."""

    code: Code = Code.INTERNAL
    status: int | None = None       # an HTTP status other than the code's own
    openai_code: str | None = None  # the OpenAI front's error code, if not ``code``

    def __init__(self, message: str, *, retry_after_ms: int | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = _text(message)
        self.retry_after_ms = retry_after_ms
        self.param = param              # the request field it is about (HTTP fronts)

    @property
    def http_status(self) -> int:
        return self.status if self.status is not None else http_status(self.code)

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"code": self.code.value, "message": self.message}
        if self.code in RETRY_CODES:
            d["retry_after_ms"] = int(self.retry_after_ms if self.retry_after_ms is not None else 250)
        return d


class ProtocolError(LlmctlError):
    code = Code.PROTOCOL


class FrameTooLarge(ProtocolError):
    code = Code.TOO_LARGE


class Unauthorized(LlmctlError):
    code = Code.UNAUTHORIZED


class BadRequest(LlmctlError):
    code = Code.BAD_REQUEST


class BodyTimeout(BadRequest):
    """An HTTP request body that did not arrive within the read timeout: 408."""
    status = 408


class ModelNotFound(BadRequest):
    """A request names a model that is not served: ``bad_request`` on the wire, OpenAI's
    404 ``model_not_found`` on the HTTP front."""
    status = 404
    openai_code = "model_not_found"


class NotFound(BadRequest):
    """A request names something the server does not hold (a stored response): 404."""
    status = 404
    openai_code = "not_found"


class TooManyStreams(LlmctlError):
    code = Code.TOO_MANY_STREAMS


class Overloaded(LlmctlError):
    code = Code.OVERLOADED


class RateLimited(LlmctlError):
    """A tenant's limit ([[tenants]]): come back after ``retry_after_ms``."""
    code = Code.RATE_LIMITED


class NotReady(LlmctlError):
    code = Code.NOT_READY


class ShuttingDown(LlmctlError):
    code = Code.SHUTTING_DOWN


class DeadlineExceeded(LlmctlError):
    code = Code.TIMEOUT


class WorkerFailed(LlmctlError):
    code = Code.WORKER_FAILED


class SlowClient(LlmctlError):
    code = Code.SLOW_CLIENT


class InternalError(LlmctlError):
    code = Code.INTERNAL


_BY_CODE: dict[Code, type[LlmctlError]] = {
    cls.code: cls for cls in (ProtocolError, FrameTooLarge, Unauthorized, BadRequest,
                              TooManyStreams, Overloaded, RateLimited, NotReady, ShuttingDown,
                              DeadlineExceeded, WorkerFailed, SlowClient, InternalError)
}


def from_code(code: str, message: str, retry_after_ms: int | None = None) -> LlmctlError:
    """Rebuild a typed error from a wire/internal code (unknown codes become internal)."""
    try:
        cls = _BY_CODE[Code(code)]
    except ValueError:
        return InternalError(f"{code}: {message}")
    return cls(message, retry_after_ms=retry_after_ms)
