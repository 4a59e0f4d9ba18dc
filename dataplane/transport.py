"""What every front's connections share: their output bounds, the server's version."""
from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger(__name__)

# Linux: the kernel takes a write only while none of the bytes before it is waiting for
# the peer's window (TCP_NOTSENT_LOWAT), so bytes a client does not read stay in this
# process's buffer, where the token credit sees them, instead of megabytes of kernel
# send buffer.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT_BYTES = 1


def limit_output(transport: asyncio.BaseTransport, limit: int) -> None:
    """Bound what a client connection may hold: the kernel keeps only what the peer's
    window takes, this process at most ``limit`` bytes of unsent frames.  ``drain()``
    then waits until every byte has gone to the kernel (high = low = 0), which is
    when a front gives token credit back."""
    transport.set_write_buffer_limits(high=0, low=0)   # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limit)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    except OSError as exc:       # not Linux, or not TCP: the write buffer still bounds it
        log.debug("cannot limit the kernel's send buffer: %s", exc)


def hard_limit(limit: int) -> int:
    """Bytes a connection may leave unread before it is dropped: token frames stop at
    the window, so only frames without credit (PONGs, errors) can pile up past this."""
    return 4 * limit + 64 + 1024


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("llmctl")
    except PackageNotFoundError:
        return "0"
