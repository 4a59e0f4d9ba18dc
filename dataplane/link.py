"""The worker link: the gateway's ZeroMQ ROUTER to its workers' DEALERs.

Three tasks on the gateway's loop: the receiver decodes and validates every message
once (``messages.from_worker``) and hands the typed message to the core, dropping and
counting what does not parse; the sender sends what the core queued whenever it wakes;
the ticker beats the core's clock and the heartbeats (any traffic counts as liveness).

With ``[cluster] bind`` a second ROUTER serves the workers of other machines over TCP,
as a CURVE server whose clients pyzmq's authenticator (ZAP, ``cluster.py``) admits by
public key; the core cannot tell a remote worker from a local one.  A remote worker's
id is ``NODE/NAME.N`` (a local one has no ``/``, so none can pose as another), and what
is sent to it goes out on the cluster socket.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import zmq
import zmq.asyncio

from llmctl.common import messages as m
from llmctl.common.procs import bind_private
from llmctl.dataplane import clock
from llmctl.dataplane.cluster import ClusterBind
from llmctl.dataplane.gateway import Gateway

log = logging.getLogger(__name__)

TICK_S = 0.1
# Worker messages handled in one round, before the fronts write what they produced: what
# is already waiting is taken at once (its output leaves in one write per connection),
# bounded so that the loop still serves the clients between rounds.
ROUND_MAX = 64
SEND_RETRY_S = 0.001     # a send to a worker whose pipe is full is tried again this often


class WorkerRouter:
    def __init__(self, gw: Gateway, ctx: zmq.asyncio.Context) -> None:
        self.gw = gw
        self.ctx = ctx
        self.router: zmq.asyncio.Socket | None = None
        self.cluster: ClusterBind | None = None
        self._remote: set[str] = set()       # workers that spoke on the cluster socket
        self._plain_of: dict[zmq.asyncio.Socket, zmq.Socket] = {}   # see ``_plain``
        self._look: dict[zmq.Socket, Callable[[], None]] = {}   # see ``_receiver``

    def bind(self) -> None:
        self.router = self._router()
        bind_private(self.router, self.gw.cfg.workers_endpoint)
        if self.gw.cfg.cluster.bind:
            self.cluster = ClusterBind(self.gw.cfg, self.ctx, self._router())
            self.cluster.bind()

    def _router(self) -> zmq.asyncio.Socket:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)   # unroutable = error, not a drop
        # Outbound per worker is bounded by its credits plus control messages.
        router.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        # A worker that reconnects (a new TCP connection, same identity) takes over.
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        return router

    def close(self) -> None:
        if self.router is not None:
            self.router.close(linger=0)
        if self.cluster is not None:
            self.cluster.close()

    def tasks(self) -> list:
        assert self.router is not None
        tasks = [self._receiver(self.router, False), self._sender(), self._ticker()]
        if self.cluster is not None:
            tasks += [self._receiver(self.cluster.router, True), self.cluster.watch()]
        return tasks

    async def _receiver(self, router: zmq.asyncio.Socket, remote: bool) -> None:
        """Rounds of worker messages, run by the loop's reader callback itself (no task
        woken per message). The socket is read without pyzmq's asyncio layer (a future,
        a reader added and removed and an exception per empty read: most of the
        gateway's cost per message at one stream), the event-loop way of the ZeroMQ
        guide: its FD only says "look at ZMQ_EVENTS", so each call takes what EVENTS
        says is waiting, and every send on the socket makes it look again (a send can
        consume the FD's signal). A round is at most ROUND_MAX messages; the next is
        run after what else the loop has to do. A failure ends this task with it."""
        sock = self._plain(router)
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        queued = False

        def round_() -> None:
            nonlocal queued
            queued = False
            try:
                n = 0
                while n < ROUND_MAX and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._handle(sock.recv_multipart(zmq.NOBLOCK), remote)
                    n += 1
                self.gw.flush()
                if n == ROUND_MAX:
                    look()
            except Exception as exc:         # handed to the task: the gateway stops
                if not failed.done():
                    failed.set_exception(exc)

        def look() -> None:
            nonlocal queued
            if not queued:
                queued = True
                loop.call_soon(round_)

        fd = sock.getsockopt(zmq.FD)
        self._look[sock] = look
        loop.add_reader(fd, round_)
        look()                               # what came before the reader was added
        try:
            await failed
        finally:
            loop.remove_reader(fd)
            self._look.pop(sock, None)
            self.gw.flush()

    def _plain(self, router: zmq.asyncio.Socket) -> zmq.Socket:
        """The same socket without the asyncio layer (one per socket, kept)."""
        sock = self._plain_of.get(router)
        if sock is None:
            sock = self._plain_of[router] = zmq.Socket.shadow(router.underlying)
        return sock

    def _handle(self, frames: list[bytes], remote: bool) -> None:
        wid = frames[0].decode(errors="replace")
        if remote:
            if "/" not in wid:     # a node's ids are NODE/NAME.N, never a local one's
                self.gw.counters.dropped_messages += 1
                log.error("dropped a message from a remote worker named %r: not NODE/...", wid)
                return
            self._remote.add(wid)
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
        router = self.cluster.router if self.cluster is not None and wid in self._remote \
            else self.router
        sock = self._plain(router)
        msg = [wid.encode(), *frames]
        try:
            while True:
                try:
                    sock.send_multipart(msg, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    # The worker's pipe is at its high-water mark (it reads nothing):
                    # the message waits, as a blocking send would, without blocking
                    # the loop.
                    await asyncio.sleep(SEND_RETRY_S)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("worker %s is unreachable: dropping it", wid)
            self.gw.worker_lost(wid, "unreachable")
        finally:
            look = self._look.get(sock)
            if look is not None:
                look()          # the send may have taken the FD's signal: look again

    async def _ticker(self) -> None:
        gw = self.gw
        last_beat = 0.0
        while True:
            await asyncio.sleep(min(gw.interval, TICK_S))
            now = time.monotonic()
            clock.tick(gw, now)
            if now - last_beat >= gw.interval:
                last_beat = now
                for wid in list(gw.sched.workers):
                    gw.send(wid, m.encode(m.Kind.HEARTBEAT))
