"""The supervisor link: the gateway's DEALER to the supervisor's ROUTER (``link.sock``).

The gateway pushes its events (it is up, a worker is ready, lost or drained) as they
happen, and answers each of the supervisor's commands with a ``Reply``: its pings (the
supervisor restarts a gateway that stops answering them), ``Status``, ``Drain``,
``DrainWorker``, ``WorkerExited``, ``Procs`` (process figures for /metrics) and
``Reconfigure`` (a reload's generation defaults, scheduling and tenants).  Every message is typed (``common/admin.py``); a malformed one is logged,
counted and dropped.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq
import zmq.asyncio

from llmctl.common import admin
from llmctl.common.errors import from_code
from llmctl.dataplane.gateway import Gateway

log = logging.getLogger(__name__)


def status(gw: Gateway) -> dict[str, Any]:
    """The gateway's part of ``llmctl status``."""
    now = time.monotonic()
    s = gw.sched
    return {
        "pid": os.getpid(), "listening": gw.listening, "http_listening": gw.http_listening,
        "model": gw.model_name, "metrics_url": gw.metrics_url, "draining": s.draining,
        "queue": len(s.queue), "max_queue": s.max_queue, "inflight": s.inflight_count(),
        "parked": s.parked_count(), "open": s.open_count(),
        "connections": gw.counters.connections, "counters": gw.counters.snapshot(),
        "errors": dict(gw.counters.errors),
        "workers": [w.snapshot(now) for w in s.workers.values()],
        "metrics": gw.metrics.snapshot(now),
        "free_credits": sum(w.available for w in s.workers.values()),
        "models": models(gw),
        "tenants": gw.tenancy.snapshot(gw.waiting()),
        "scheduling": gw.cfg.scheduling.policy,
    }


def models(gw: Gateway) -> dict[str, dict[str, Any]]:
    """Per model: what the supervisor's eviction and ``llmctl models`` need."""
    now = time.monotonic()
    return {s.model: {"queue": len(s.queue), "inflight": s.inflight_count(),
                      "parked": s.parked_count(), "open": s.open_count(),
                      "workers_ready": sum(1 for w in s.workers.values() if not w.draining),
                      "idle_s": round(now - s.last_used, 3) if s.last_used else None,
                      "served": sum(w.served for w in s.workers.values())}
            for s in gw.sched}


class SupervisorLink:
    def __init__(self, gw: Gateway, ctx: zmq.asyncio.Context) -> None:
        self.gw = gw
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"gateway.{os.getpid()}".encode())

    def connect(self) -> None:
        self.sock.connect(self.gw.cfg.link_endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)

    def up(self) -> None:
        """The fronts listen: the gateway is ready."""
        gw = self.gw
        gw.events.put_nowait(admin.GatewayUp(pid=os.getpid(), listening=gw.listening,
                                             http_listening=gw.http_listening,
                                             metrics_url=gw.metrics_url))

    def tasks(self) -> list:
        return [self._commands(), self._events()]

    async def _events(self) -> None:
        while True:
            event = await self.gw.events.get()
            await self.sock.send(admin.encode(event))

    async def _commands(self) -> None:
        while True:
            raw = await self.sock.recv()
            try:
                cmd = admin.decode_command(raw)
            except admin.AdminError as exc:
                self.gw.counters.dropped_messages += 1
                log.error("dropped a malformed command from the supervisor: %s", exc)
                continue
            await self.sock.send(admin.encode(self.handle(cmd)))

    def handle(self, cmd: admin.Command) -> admin.Reply:
        gw = self.gw
        match cmd:
            case admin.Ping():
                return admin.Reply(id=cmd.id)
            case admin.Status():
                return admin.Reply(id=cmd.id, data=status(gw))
            case admin.Drain():
                gw.drain()
                return admin.Reply(id=cmd.id, data=status(gw))
            case admin.DrainWorker(worker=wid):
                if gw.drain_worker(wid):
                    return admin.Reply(id=cmd.id)
                return admin.Reply(id=cmd.id, ok=False, error=f"no worker {wid!r}")
            case admin.WorkerExited(worker=wid, why=why):
                gw.worker_lost(wid, why, tell=False)    # the supervisor knows already
                return admin.Reply(id=cmd.id)
            case admin.Procs(procs=procs):
                gw.procs = procs
                return admin.Reply(id=cmd.id)
            case admin.Models():
                return admin.Reply(id=cmd.id, data=models(gw))
            case admin.ModelUnavailable():
                n = gw.model_unavailable(cmd.model, from_code(cmd.code, cmd.message,
                                                              cmd.retry_after_ms))
                return admin.Reply(id=cmd.id, data={"failed": n})
            case admin.Reconfigure(generation=g, scheduling=sc, tenants=tenants):
                try:
                    gw.reconfigure(g, sc, tenants)
                except (OSError, ValueError) as exc:      # the keys file
                    return admin.Reply(id=cmd.id, ok=False, error=str(exc))
                return admin.Reply(id=cmd.id)
        return admin.Reply(id=cmd.id, ok=False, error=f"{type(cmd).__name__} is not for the gateway")

