"""Gateway process entry point: owns its event loop, ZeroMQ context, signals, logging."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import zmq.asyncio

from llmctl.common.config import Config
from llmctl.common.procs import CONFIG_JSON_ENV, setup_child_logging
from llmctl.dataplane.gateway import Gateway

log = logging.getLogger(__name__)


async def _serve(cfg: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ppid = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == ppid:
            await asyncio.sleep(0.5)
        log.error("supervisor is gone: exiting")
        stop.set()

    watcher = asyncio.create_task(watch_parent())
    ctx = zmq.asyncio.Context()
    try:
        await Gateway(cfg, ctx).run(stop)
    finally:
        watcher.cancel()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    cfg = Config.from_json(os.environ[CONFIG_JSON_ENV])
    setup_child_logging("gateway")
    try:
        asyncio.run(_serve(cfg))
    except OSError as exc:
        log.error("gateway cannot start: %s", exc)
        return 2
    log.info("gateway stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
