"""The head's endpoint for the workers of other machines (``[cluster] bind``).

A ROUTER bound to a TCP address, a CURVE server with the head's keypair.  pyzmq's
``AsyncioAuthenticator`` answers the ZAP requests of its handshakes: a client key is
admitted when it is one of the ``*.key`` files of ``[cluster] authorized_keys`` (the
directory is read at every handshake, so keys are added and revoked without a restart);
an unknown key is refused and logged with its fingerprint.  ``allow_insecure`` (loopback
only, checked by the config) binds without CURVE.
"""
from __future__ import annotations

import logging
import time

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from llmctl.common import keys
from llmctl.common.config import Config

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0           # a peer that keeps failing its handshake is logged this often
_HANDSHAKE = ("the security handshake failed: not a CURVE client (plain TCP?), or one "
              "that pins another head key")
_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: _HANDSHAKE,
           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: _HANDSHAKE,
           zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the key is not authorized"}


class _AuthorizedKeys:
    """The authenticator's credentials provider: the authorized_keys directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.refused = 0
        self.admitted = 0

    def callback(self, domain: str, key: bytes) -> bool:
        names = keys.authorized(self.directory)
        name = names.get(bytes(key))
        if name is None:
            self.refused += 1
            log.warning("refused a worker connection: unknown CURVE key, fingerprint %s; "
                        "add its .key file to %s to admit it", keys.fingerprint(key),
                        self.directory)
            return False
        self.admitted += 1
        log.info("admitted a worker connection: key %s (%s)", name, keys.fingerprint(key))
        return True


class ClusterBind:
    def __init__(self, cfg: Config, ctx: zmq.asyncio.Context, router: zmq.asyncio.Socket) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.router = router
        self.auth: AsyncioAuthenticator | None = None
        self.monitor: zmq.asyncio.Socket | None = None
        self.refused = 0
        self.keys: _AuthorizedKeys | None = None

    def bind(self) -> None:
        c = self.cfg.cluster
        if c.secret_key:
            self.auth = AsyncioAuthenticator(self.ctx)
            self.auth.start()
            self.keys = _AuthorizedKeys(c.authorized_keys)
            self.auth.configure_curve_callback(domain="llmctl", credentials_provider=self.keys)
            fp = keys.server_options(self.router, c.secret_key)
            known = keys.authorized(c.authorized_keys)
            log.info("cluster endpoint %s: CURVE, head key %s, %d authorized node key(s) in %s",
                     c.bind, fp, len(known), c.authorized_keys)
        else:
            log.warning("cluster endpoint %s WITHOUT CURVE (allow_insecure, loopback only)",
                        c.bind)
        self.monitor = self.router.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self.router.bind(c.bind)

    async def watch(self) -> None:
        """Log the connections the endpoint refused (counted, at most every LOG_EVERY_S)."""
        assert self.monitor is not None
        last: dict[int, float] = {}
        since: dict[int, int] = {}
        while True:
            kind = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            self.refused += 1
            since[kind] = since.get(kind, 0) + 1
            now = time.monotonic()
            if now - last.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:     # per kind of failure
                log.warning("refused a connection to %s: %s (%d such refusal(s) since the "
                            "last such line)", self.cfg.cluster.bind,
                            _FAILED.get(kind, f"handshake failed ({kind})"), since[kind])
                last[kind], since[kind] = now, 0

    def close(self) -> None:
        if self.monitor is not None:
            self.router.disable_monitor()
            self.monitor.close(linger=0)
        self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
