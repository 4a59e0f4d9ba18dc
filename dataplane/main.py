"""Gateway process entry point: owns its event loop, ZeroMQ context, signals, logging, and
wires the core (``gateway.py``) to its links and fronts:

* ``link.WorkerRouter``: the ROUTER to the workers;
* ``supervisor_link.SupervisorLink``: the DEALER to the supervisor (events, commands);
* the fronts: the binary port (``serve_binary``: the binary protocol, ``tcp``, and the
  seed's CC50 framing, ``cc50``) and ``http`` (the HTTP dialects, when ``[http] enabled``)
  on one aiohttp server that serves ``/metrics`` (``prom``) always.

The binary port ([gateway] host:port) is one listener with a dialect per connection: a
connection's first four bytes say which framing it speaks, the CC50 magic (the seed's
``cc50_llm_client``) or else the length field of the binary protocol's HELLO.  A
connection that sends nothing within ``[gateway] handshake_timeout_s`` is closed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import zmq.asyncio
from aiohttp import web

from llmctl.common import cc50
from llmctl.common.config import Config
from llmctl.common.procs import CONFIG_JSON_ENV, setup_child_logging
from llmctl.dataplane import prom
from llmctl.dataplane.cc50 import Cc50Connection
from llmctl.dataplane.http import app as http
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.link import WorkerRouter
from llmctl.dataplane.supervisor_link import SupervisorLink
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


async def _watch_parent(stop: asyncio.Event) -> None:
    ppid = os.getppid()
    while os.getppid() == ppid:
        await asyncio.sleep(0.5)
    log.error("supervisor is gone: exiting")
    stop.set()


async def _until(stop: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Until ``stop`` is set or a task ends; a task's exception is raised."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for t in done:
        if t is not stopper and t.exception():
            raise t.exception()  # type: ignore[misc]


async def _serve(cfg: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctx = zmq.asyncio.Context()
    gw = Gateway(cfg)
    workers, supervisor = WorkerRouter(gw, ctx), SupervisorLink(gw, ctx)
    server: asyncio.AbstractServer | None = None
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task] = []
    try:
        workers.bind()
        supervisor.connect()
        server = await serve_binary(gw)
        gw.listening = [f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets]
        # One HTTP server: the OpenAI front when enabled, /metrics always.
        app = http.build_app(gw) if cfg.http.enabled else web.Application()
        prom.add_metrics_route(app, gw)
        runner = await http.serve_http(gw, app)
        gw.http_listening = [f"{a[0]}:{a[1]}" for a in runner.addresses] if cfg.http.enabled \
            else []
        gw.metrics_url = f"http://{cfg.http.host}:{cfg.http.port}/metrics"
        supervisor.up()
        tasks = [asyncio.create_task(c) for c in
                 (*workers.tasks(), *supervisor.tasks(), _watch_parent(stop))]
        await _until(stop, tasks)
    finally:
        for t in tasks:
            t.cancel()
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()
        workers.close()
        supervisor.close()
        ctx.term()


def _run(cfg: Config) -> None:
    """The loop: uvloop's when ``[gateway] uvloop`` and it is installed (its transports
    write a frame in a fraction of asyncio's time), else asyncio's."""
    if cfg.gateway.uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed: the asyncio event loop serves")
        else:
            uvloop.run(_serve(cfg))
            return
    asyncio.run(_serve(cfg))


def main(argv: list[str] | None = None) -> int:
    cfg = Config.from_json(os.environ[CONFIG_JSON_ENV])
    setup_child_logging("gateway")
    try:
        _run(cfg)
    except OSError as exc:
        log.error("gateway cannot start: %s", exc)
        return 2
    log.info("gateway stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
