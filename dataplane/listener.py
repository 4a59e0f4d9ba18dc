"""The binary port ([gateway] host:port): one listener, a dialect per connection.

A connection's first four bytes say which framing it speaks: the CC50 magic (``cc50.py``,
the seed's ``cc50_llm_client``), otherwise the length field of the binary protocol's HELLO
(``tcp.py``).  A connection that sends nothing within ``[gateway] handshake_timeout_s``
is closed.
"""
from __future__ import annotations

import asyncio
import logging

from llmctl.common import cc50
from llmctl.dataplane.cc50 import Cc50Connection
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.tcp import Connection

log = logging.getLogger(__name__)


async def serve_binary(gw: Gateway) -> asyncio.AbstractServer:
    cfg = gw.cfg.gateway

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(reader.readexactly(4), cfg.handshake_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            log.info("%s: nothing within %.1fs: closing", writer.get_extra_info("peername"),
                     cfg.handshake_timeout_s)
            writer.close()
            return
        try:
            if first == cc50.MAGIC_BYTES:
                await Cc50Connection(gw, reader, writer).run(first)
            else:
                await Connection(gw, reader, writer).run(first)
        except asyncio.CancelledError:      # the gateway stops with the client connected
            writer.transport.abort()

    server = await asyncio.start_server(handle, cfg.host, cfg.port, reuse_address=True)
    log.info("binary protocol (and CC50) listening on %s",
             ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets))
    return server
