"""The supervisor's part of a cluster (docs/cluster.md).

On a node (``[node] join``): its workers report how their link to the head stands
(``admin.LinkReport`` on ``run_dir/node.sock``, PUSH -> PULL); ``serve_reports`` applies
those reports to the worker processes (the first one means loaded and warm; joined means
serving, which the restart policy, a reload's surge and the model plan count as ready),
``drain`` asks one to finish what it holds, and ``node_view`` is what `llmctl status`
shows of them.

On a head: ``remote_workers`` lists the workers of other machines as its gateway sees
them, beside the head's own processes.
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Callable

import zmq.asyncio

from llmctl.common import admin
from llmctl.control.child import WorkerProcess
from llmctl.control.states import ProcessState

log = logging.getLogger(__name__)

# A running process's state in `llmctl status`, from its link to the head.
_STATE_OF_LINK = {"joined": "running", "connecting": "connecting"}
# What the gateway knows of a worker it serves, shown beside the process's own figures.
GATEWAY_KEYS = ("slots", "credits", "inflight", "parked", "served", "device", "kv_store",
                 "threads")


async def serve_reports(sock: zmq.asyncio.Socket, find: Callable[[str], WorkerProcess | None],
                        ready: Callable[[], None]) -> None:
    """Apply each report to its process; ``ready()`` once one has joined (serves)."""
    while True:
        raw = await sock.recv()
        try:
            rep = admin.decode_link_report(raw)
        except admin.AdminError as exc:
            log.error("dropped a malformed worker report: %s", exc)
            continue
        w = find(rep.worker)
        if w is None or w.pid != rep.pid:
            continue                          # an old spawn's last words
        if rep.state == "drained":
            w.drained = True
            log.info("%s drained", w.name)
            continue
        w.link, w.link_detail = rep.state, rep.detail
        if w.state is ProcessState.STARTING:      # loaded and warm: it serves once joined
            w.to(ProcessState.RUNNING)
        if rep.state == "joined":             # serving: a reload's surge may retire the old
            w.mark_ready()
            ready()
        level = logging.WARNING if rep.state in ("lost", "refused") else logging.INFO
        log.log(level, "%s: link to the head %s%s", w.name, rep.state,
                f" ({rep.detail})" if rep.detail else "")


def drain(w: WorkerProcess) -> None:
    """Ask a node's worker to finish what it holds (it says DRAINING to the gateway and
    reports drained when idle): SIGUSR1, whose handler only sets a flag."""
    if w.proc is not None and w.pid is not None:
        try:
            w.proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            w.drained = True
    else:
        w.drained = True


def node_view(w: WorkerProcess, snap: dict[str, Any]) -> None:
    """A node's worker in its status: its link to the head, and its slots."""
    snap["link"] = w.link or "-"
    snap["slots"] = w.cfg.workers.slots
    if w.state is ProcessState.RUNNING:
        snap["state"] = _STATE_OF_LINK.get(w.link, w.link or "running")
    if w.link_detail:
        snap["link_detail"] = w.link_detail


def remote_workers(live: dict[str, dict[str, Any]], mine: set[str], node: str,
                   rates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers the gateway serves that are not this machine's processes."""
    out = []
    for wid, info in live.items():
        if wid in mine or info.get("node", "") in ("", node):
            continue
        out.append({
            "id": info["name"], "node": info["node"], "remote": True, "pid": info["pid"],
            "state": info["state"], "rss": None, "uptime_s": 0.0, "restarts": 0,
            "last_exit": None, "stderr_tail": [], "vram_mib": None, "cpu": None,
            "tokens_per_s": rates.get(info["name"], {}).get("tokens_per_s", 0.0),
            "last_seen_s": info.get("last_seen_s"), **{k: info.get(k) for k in GATEWAY_KEYS}})
    return out
