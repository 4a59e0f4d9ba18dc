"""A running llmctl as the tools see it: ``llmctl status --json`` of a config.

The tools that measure a running service (soak, connscale, measure_failover, ``llmctl bench
--overload -c``) learn its gateway's address and every pid from here.
"""
from __future__ import annotations

import json
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
