"""`llmctl reload`: the config file read again and turned into a new desired state.

``Reload.begin`` reads the file and compares it with the running config: the sections a
rolling reload applies (``ROLLING``) make the target config; every other change (the
gateway's listeners and heartbeat, the control plane, ...) is reported as not applied,
and adding, removing, renaming or reordering served models is refused.  The supervisor
makes the target its desired state; ``Reload.track`` follows the rollout every tick
until it has converged (``done``) or a surge was aborted (``failed``).  Its state is a
``states.ReloadState``; one reload runs at a time.
"""
from __future__ import annotations

import logging
from typing import Any

import msgspec

from llmctl.common import config as config_mod
from llmctl.common.config import Config, ConfigError
from llmctl.control.rollout import Rollout
from llmctl.control.states import ReloadState, move

log = logging.getLogger(__name__)

# Sections a rolling reload applies; the rest needs a restart of the gateway.
ROLLING = ("model", "workers", "generation", "synthetic", "models", "scheduling", "tenants")
GATEWAY_WORKER_KEYS = ("heartbeat_interval_s", "liveness", "probe_interval_s", "probe_timeout_s")


class Reload:
    def __init__(self) -> None:
        self.state = ReloadState.IDLE            # changed by ``to`` only
        self.changed: list[str] = []
        self.not_applied: list[str] = []
        self.step = ""                           # the rollout's current step
        self.error: str | None = None
        self.target: Config | None = None        # what the workers converge to

    def __str__(self) -> str:
        return "the reload"

    def to(self, state: ReloadState) -> None:
        self.state = move(self, self.state, state)

    def begin(self, cfg: Config) -> str | None:
        """Start converging from ``cfg`` to its file's content: None, or why not."""
        if self.state is ReloadState.ROLLING:
            return "a reload is already running"
        try:
            new = config_mod.load(cfg.source)
        except ConfigError as exc:
            return str(exc)
        if [e.name for e in new.served] != [e.name for e in cfg.served]:
            return ("adding, removing, renaming or reordering served models needs "
                    "`llmctl stop` + `llmctl start`")
        self.changed, self.not_applied = diff_configs(cfg, new)
        self.target = rolled(cfg, new, self.not_applied)
        self.step, self.error = "", None
        self.to(ReloadState.ROLLING)
        return None

    def track(self, rollout: Rollout) -> Config | None:
        """Follow the rollout; the target config on the tick it has converged."""
        if self.state is not ReloadState.ROLLING:
            return None
        self.step = rollout.step_text()
        if rollout.failed:
            self.error, self.step = rollout.failed, ""
            self.to(ReloadState.FAILED)
            log.error("reload failed: %s", rollout.failed)
        elif rollout.converged:
            self.step = ""
            self.to(ReloadState.DONE)
            log.info("reload done: %s", ", ".join(self.changed) or "no change")
            return self.target
        return None

    def view(self) -> dict[str, Any]:
        """What `llmctl status` shows (and `llmctl reload` is answered)."""
        if self.state is ReloadState.IDLE:
            return {"state": self.state.value}
        return {"state": self.state.value, "changed": self.changed,
                "not_applied": self.not_applied, "step": self.step, "error": self.error}


def rolled(old: Config, new: Config, not_applied: list[str]) -> Config:
    """``old`` with the sections a rolling reload applies taken from ``new`` (the
    gateway's worker keys stay ``old``'s: the gateway is not restarted)."""
    applied = {s: getattr(new, s) for s in ROLLING}
    if any(k.startswith("workers.") and k.split(".", 1)[1] in GATEWAY_WORKER_KEYS
           for k in not_applied):
        applied["workers"] = msgspec.structs.replace(
            new.workers, **{k: getattr(old.workers, k) for k in GATEWAY_WORKER_KEYS})
    return msgspec.structs.replace(old, **applied)


def diff_configs(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(every changed key, the changed keys a rolling reload cannot apply)."""
    changed, not_applied = [], []
    for array in ("models", "tenants"):
        if getattr(old, array) != getattr(new, array):
            changed.append(array)
    for section in ("model", "workers", "generation", "gateway", "http", "control", "gpu",
                    "synthetic", "cluster", "node", "host", "scheduling"):
        a, b = getattr(old, section), getattr(new, section)
        for f in msgspec.structs.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                key = f"{section}.{f.name}"
                changed.append(key)
                if section not in ROLLING or (section == "workers"
                                              and f.name in GATEWAY_WORKER_KEYS):
                    not_applied.append(key)
    return changed, not_applied
