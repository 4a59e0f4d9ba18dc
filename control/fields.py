"""The field helper of every config section: a default with its range and its doc."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, lo: float | None = None, hi: float | None = None,
            choices: tuple[str, ...] | None = None, doc: str = "") -> Any:
    """A dataclass field whose metadata ``control.config`` checks and documents."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "doc": doc})
