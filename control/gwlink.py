"""The supervisor's end of the link to the gateway (``run_dir/link.sock``, a ROUTER).

Each gateway spawn connects a DEALER named ``gateway.<pid>``.  ``call`` sends a command
and waits for its ``Reply``; ``tell`` sends one without waiting (pings, process
figures); everything else the gateway sends is an event, handed to ``on_event``.
``last_heard`` is when the current gateway last said anything: its liveness.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from llmctl.common import admin
from llmctl.common.procs import bind_private

log = logging.getLogger(__name__)


class GatewayLink:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str,
                 on_event: Callable[[admin.FromGateway], None]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a gateway not connected: an error
        self.endpoint = endpoint
        self.on_event = on_event
        self.peer: bytes | None = None          # the identity of the gateway to talk to
        self.last_heard = 0.0
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[admin.Reply]] = {}

    def bind(self) -> None:
        bind_private(self.sock, self.endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)

    def expect(self, pid: int | None) -> None:
        """Talk to the gateway of this pid from now on (a new spawn, or none)."""
        self.peer = f"gateway.{pid}".encode() if pid else None
        self.last_heard = time.monotonic()
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()

    def _send(self, cmd: admin.Command) -> "asyncio.Future[Any] | None":
        if self.peer is None:
            return None
        return self.sock.send_multipart([self.peer, admin.encode(cmd)], flags=zmq.NOBLOCK)

    def tell(self, cmd: admin.Command) -> None:
        """Send without waiting (dropped if no gateway is connected: it is sent again)."""
        fut = self._send(cmd)
        if fut is not None:
            fut.add_done_callback(_quiet)

    async def call(self, cmd: admin.Command, timeout: float = 1.0) -> admin.Reply | None:
        """Send ``cmd`` and wait for its reply; None without a gateway or an answer."""
        cmd_id = next(self._ids)
        cmd = msgspec.structs.replace(cmd, id=cmd_id)
        reply: asyncio.Future[admin.Reply] = asyncio.get_running_loop().create_future()
        self._waiting[cmd_id] = reply
        try:
            sent = self._send(cmd)
            if sent is None:
                return None
            await sent                        # raises if no gateway is connected
            return await asyncio.wait_for(reply, timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError, zmq.ZMQError):
            return None
        finally:
            self._waiting.pop(cmd_id, None)

    async def run(self) -> None:
        while True:
            peer, raw = await self.sock.recv_multipart()
            if peer != self.peer:
                continue            # an old spawn's last words
            self.last_heard = time.monotonic()
            try:
                msg = admin.decode_from_gateway(raw)
            except admin.AdminError as exc:
                log.error("dropped a malformed message from the gateway: %s", exc)
                continue
            if isinstance(msg, admin.Reply):
                fut = self._waiting.get(msg.id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self.on_event(msg)


def _quiet(fut: "asyncio.Future[Any]") -> None:
    """A dropped message: the gateway was not connected; ping and figures go again soon."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("not sent to the gateway: %s", fut.exception())
