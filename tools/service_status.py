"""An llmctl service as the tools and the tests see it: the config they write for one, and
``llmctl status --json`` of a running one.

The tools that measure a running service (soak, connscale, measure_failover, ``llmctl bench
--overload -c``) learn its gateway's address and every pid from here; the tools and tests
that start one write its config with ``toml_text`` on ``free_port``s.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from typing import Any

SERVING = ("ready", "busy")


def status(config: str) -> dict[str, Any]:
    """``llmctl status --json -c config`` (``{"running": False}`` when it is not running)."""
    r = subprocess.run([sys.executable, "-m", "llmctl.control", "status", "--json", "-c", config],
                       capture_output=True, text=True, timeout=30)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"running": False}


def serving(st: dict[str, Any]) -> bool:
    """Is every worker of that status serving?"""
    return bool(st.get("running")) and all(w["state"] in SERVING for w in st["workers"])


def gateway_address(st: dict[str, Any]) -> tuple[str, int]:
    """The (host, port) of the gateway's TCP front."""
    host, port = st["gateway"]["listening"][0].rsplit(":", 1)
    return host, int(port)


def _toml_key(k: str) -> str:
    """A bare key where TOML allows one (``n_ctx``), else a quoted one."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return v.isoformat()                        # TOML's dates and times


def toml_text(raw: dict[str, Any]) -> str:
    """A config tree (sections, arrays of tables such as ``[[models]]``) as TOML; an empty
    array of tables is left out."""
    out = []
    for name, value in raw.items():
        if isinstance(value, dict):
            out.append(f"[{name}]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n"
                                               for k, v in value.items()))
        elif isinstance(value, list) and all(isinstance(e, dict) for e in value):
            out.extend(f"[[{name}]]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n"
                                                 for k, v in e.items()) for e in value)
        else:
            out.insert(0, f"{_toml_key(name)} = {_toml_value(value)}\n")
    return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
