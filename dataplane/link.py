"""The worker link: the gateway's ZeroMQ ROUTER to its workers' DEALERs.

Three tasks on the gateway's loop: the receiver decodes and validates every message
once (``messages.from_worker``) and hands the typed message to the core, dropping and
counting what does not parse; the sender sends what the core queued whenever it wakes;
the ticker beats the core's clock and the heartbeats (any traffic counts as liveness).
"""
from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio

from llmctl.common import messages as m
from llmctl.common.procs import bind_private
from llmctl.dataplane.gateway import Gateway

log = logging.getLogger(__name__)

TICK_S = 0.1
# Worker messages handled in one round, before the fronts write what they produced: what
# is already waiting is taken at once (its output leaves in one write per connection),
# bounded so that the loop still serves the clients between rounds.
ROUND_MAX = 64


class WorkerLink:
    def __init__(self, gw: Gateway, ctx: zmq.asyncio.Context) -> None:
        self.gw = gw
        self.ctx = ctx
        self.router: zmq.asyncio.Socket | None = None

    def bind(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)   # unroutable = error, not a drop
        # Outbound per worker is bounded by its credits plus control messages.
        router.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        self.router = router
        bind_private(router, self.gw.cfg.workers_endpoint)

    def close(self) -> None:
        if self.router is not None:
            self.router.close(linger=0)

    def tasks(self) -> list:
        return [self._receiver(), self._sender(), self._ticker()]

    async def _receiver(self) -> None:
        assert self.router is not None
        # The same socket without the asyncio layer: takes what is already queued, or
        # raises zmq.Again at once.
        waiting = zmq.Socket.shadow(self.router.underlying)
        try:
            while True:
                self._handle(await self.router.recv_multipart())
                for _ in range(ROUND_MAX - 1):
                    try:
                        frames = waiting.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
                self.gw.flush()
        finally:
            self.gw.flush()

    def _handle(self, frames: list[bytes]) -> None:
        wid = frames[0].decode(errors="replace")
        try:
            msg = m.from_worker(frames[1:])
        except m.MessageError as exc:
            self.gw.counters.dropped_messages += 1
            log.error("dropped a malformed message from worker %s: %s", wid, exc)
            return
        self.gw.on_worker(wid, msg)

    async def _sender(self) -> None:
        gw = self.gw
        while True:
            await gw.wake.wait()
            gw.wake.clear()
            for wid, frames in gw.outgoing():
                await self._route(wid, frames)

    async def _route(self, wid: str, frames: list[bytes]) -> None:
        assert self.router is not None
        try:
            await self.router.send_multipart([wid.encode(), *frames])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("worker %s is unreachable: dropping it", wid)
            self.gw.worker_lost(wid, "unreachable")

    async def _ticker(self) -> None:
        gw = self.gw
        last_beat = 0.0
        while True:
            await asyncio.sleep(min(gw.interval, TICK_S))
            now = time.monotonic()
            gw.tick(now)
            if now - last_beat >= gw.interval:
                last_beat = now
                for wid in list(gw.sched.workers):
                    gw.send(wid, m.encode(m.Kind.HEARTBEAT))
