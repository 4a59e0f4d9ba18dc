"""Prompt files: JSONL, one request's prompt or chat messages a line (``docs/prompts/``).

Read by the load generator (``llmctl bench --prompts``) and by
``python -m llmctl.worker.spec_ceiling``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """JSONL: one ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}...]}`` a line.

    Blank lines and lines starting with ``#`` are skipped; other keys are kept and sent.
    """
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        has_p, has_m = isinstance(obj.get("prompt"), str), obj.get("messages") is not None
        if has_p == has_m:
            raise ValueError(f"{path}:{n}: needs exactly one of a string \"prompt\" and \"messages\"")
        if has_m and not (isinstance(obj["messages"], list) and obj["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in obj["messages"])):
            raise ValueError(f"{path}:{n}: messages must be a non-empty list of "
                             "{\"role\": str, \"content\": str}")
        out.append(obj)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out
