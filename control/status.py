"""What the supervisor reports: `llmctl status`, `llmctl models`, and the process figures
it pushes to the gateway for /metrics.

``status`` joins the supervisor's process table with the gateway's view of the same
workers (their slots, requests in flight, served counts): a worker the gateway serves
shows the gateway's state (``ready``, ``busy``), one it does not yet serve its process
state (``starting``, ``backoff``, ...), one being retired ``draining``.  On a head it
also lists the workers of other machines.
"""
from __future__ import annotations

import os
import time
from typing import Any, Protocol

import psutil

from llmctl.common import admin
from llmctl.common.config import Config
from llmctl.control import gpu, node
from llmctl.control.child import ChildProcess, WorkerProcess
from llmctl.control.models import ModelManager
from llmctl.control.reload import Reload
from llmctl.control.rollout import Rollout
from llmctl.control.states import ProcessState


class Supervised(Protocol):
    """What the report reads of the supervisor."""
    cfg: Config
    gateway: ChildProcess
    gateway_up: admin.GatewayUp | None
    rollout: Rollout
    models: ModelManager
    reload: Reload
    gpu: gpu.GpuMonitor | None
    usage: dict[str, Any]                 # the gateway's last per-model figures
    cpu: dict[str, float | None]          # CPU % per process, from the last figures
    started: float
    stopping: bool

    @property
    def workers(self) -> list[WorkerProcess]: ...


def status(sup: Supervised, gw: dict[str, Any]) -> dict[str, Any]:
    """The whole picture: the process table joined with the gateway's view ``gw``."""
    cfg = sup.cfg
    live = {w["id"]: w for w in gw.get("workers", [])}
    wm = gw.get("metrics", {}).get("workers", {})
    workers = []
    for w in sup.workers:
        snap = w.snapshot()
        info = live.get(w.routing_id)
        if info and w.state is ProcessState.RUNNING:
            snap.update({k: info[k] for k in node.GATEWAY_KEYS})
        else:
            snap.update({"inflight": 0, "credits": 0})
        snap["state"] = _state_of(sup, w, info)
        snap["vram_mib"] = _vram_of(sup, w)
        snap["cpu"] = sup.cpu.get(w.name)
        snap["tokens_per_s"] = wm.get(w.name, {}).get("tokens_per_s", 0.0)
        snap["model"] = w.cfg.default_model.name
        snap["node"] = cfg.node_name
        if cfg.is_node:
            node.node_view(w, snap)
        workers.append(snap)
    workers += node.remote_workers(live, {w.routing_id for w in sup.workers}, cfg.node_name, wm)
    up = sup.gateway_up
    return {
        "pid": os.getpid(), "uptime_s": round(time.time() - sup.started, 3),
        "config": cfg.source, "model": cfg.model.path,
        "stopping": sup.stopping,
        "role": "node" if cfg.is_node else "head", "node": cfg.node_name,
        "join": cfg.node.join, "cluster_bind": cfg.cluster.bind,
        "reload": sup.reload.view(),
        "gpu": sup.gpu.last if sup.gpu else None,
        "metrics": gw.get("metrics", {}), "free_credits": gw.get("free_credits", 0),
        "gateway": {**sup.gateway.snapshot(),
                    "listening": gw.get("listening", up.listening if up else []),
                    "http_listening": gw.get("http_listening",
                                             up.http_listening if up else []),
                    "metrics_url": gw.get("metrics_url", ""),
                    **{k: gw.get(k, 0) for k in ("queue", "inflight", "parked",
                                                 "connections")},
                    "counters": gw.get("counters", {}), "errors": gw.get("errors", {})},
        "workers": workers,
        "models": model_rows(sup, gw.get("models")),
        "scheduling": gw.get("scheduling", cfg.scheduling.policy),
        "tenants": gw.get("tenants", {}),
    }


def model_rows(sup: Supervised, usage: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`llmctl models`: each served model's state, plan and measured memory (``usage``:
    the gateway's per-model figures; by default the last ones it gave)."""
    measured: dict[str, float | None] = {}
    for m in sup.models.models.values():
        procs = [w for w in sup.workers if w.name in m.names and w.pid]
        if sup.models.kind == "vram":
            vals = [_vram_of(sup, w) for w in procs]
            measured[m.name] = round(sum(v for v in vals if v), 1) if procs else None
        else:
            rss = [w.rss() for w in procs]
            measured[m.name] = round(sum(r for r in rss if r) / 2 ** 20, 1) if procs else None
    return sup.models.rows(time.monotonic(), measured, usage if usage is not None else sup.usage)


def procs(sup: Supervised) -> dict[str, Any]:
    """Process figures for the gateway's /metrics (CPU: since the previous call)."""
    me = psutil.Process()
    workers = sup.rollout.workers
    return {
        "supervisor": {"pid": me.pid, "rss": me.memory_info().rss, "cpu": me.cpu_percent(None)},
        "gateway": {"pid": sup.gateway.pid, "rss": sup.gateway.rss(),
                    "cpu": sup.gateway.cpu_percent()},
        "workers": [{"name": w.name, "pid": w.pid, "state": w.state.value,
                     "restarts": w.restarts, "rss": w.rss(), "cpu": w.cpu_percent(),
                     "vram_mib": _vram_of(sup, w), "model": w.cfg.default_model.name}
                    for w in workers.values()],
        "gpu": sup.gpu.last if sup.gpu else None,
        "models": {m.name: {"state": m.state.value, "workers": m.names}
                   for m in sup.models.models.values()},
    }


def _state_of(sup: Supervised, w: WorkerProcess, info: dict[str, Any] | None) -> str:
    if w in sup.rollout.retiring:
        return "draining"
    return info["state"] if info and w.state is ProcessState.RUNNING else w.state.value


def _vram_of(sup: Supervised, w: WorkerProcess) -> float | None:
    if sup.gpu is None or not sup.gpu.last.get("enforced"):
        return None
    return sup.gpu.last["workers"].get(w.name)
