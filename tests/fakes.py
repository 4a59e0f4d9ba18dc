"""Test doubles."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping

from llmctl.control.gpu_estimate import MiB


class FakeReader:
    """A VramReader with injected readings, for tests (set ``per_pid`` between samples)."""

    def __init__(self, per_pid: Mapping[int, int] | None = None, *, total: int = 1024 * MiB,
                 name: str = "Fake GPU", available: bool = True, other_used: int = 0) -> None:
        self.per_pid = dict(per_pid or {})
        self.total = total
        self.name = name
        self._available = available
        self.other_used = other_used

    def available(self) -> bool:
        return self._available

    def device_name(self) -> str:
        return self.name if self._available else "cpu"

    def total_bytes(self) -> int:
        return self.total if self._available else 0

    def used_bytes(self) -> int:
        return sum(self.per_pid.values()) + self.other_used if self._available else 0

    def per_process(self) -> dict[int, int]:
        return dict(self.per_pid) if self._available else {}


@contextlib.contextmanager
def illegal_transitions() -> Iterator[list[str]]:
    """The illegal state transitions logged meanwhile (control/states.py), as messages."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("llmctl.control.states")
    handler = Collect(logging.ERROR)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


class Recorder:
    """A front's Output that keeps what the core hands it (``dataplane.streams.Output``):
    tokens, and the end (("done", Finished) or ("error", LlmctlError))."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.logprobs_seen: list[list[dict]] = []
        self.ends: list[tuple[str, object]] = []

    def token(self, s, text):
        self.tokens.append(text)

    def logprobs(self, s, content):
        self.logprobs_seen.append(content)

    def done(self, s, fin):
        self.ends.append(("done", fin))

    def error(self, s, err):
        self.ends.append(("error", err))
