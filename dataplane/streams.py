"""The output path every front shares: a request's ``Stream``, a connection's ``Channel``.

A front is an adapter: it turns its wire format into a ``GenRequest`` and renders the
core's events back (an ``Output``: token, logprobs, done, error -> bytes of its dialect).
What happens between is here, once, for every dialect:

* ``Stream``: one admitted request: its routing and timing, and its token credit. A
  worker may send ``[gateway] token_window`` TOKENs ahead of what the stream's client
  has taken (``granted``); ``owed`` counts tokens the client took that the worker has
  not been credited for yet.
* ``Channel``: one client connection (a TCP connection carrying several streams, an SSE
  response carrying one). Rendered bytes are queued and written once per round of worker
  messages (``flush``); when the kernel took everything the channel's streams get their
  credit back in batches of a quarter window, else credit waits until the connection
  drains. A stream whose client takes nothing is parked, then ended ``slow_client``
  (``clock.py``); a connection that leaves more than ``hard_limit`` bytes unread is closed.
  Every front bounds its connections' output with ``limit_output`` when it opens them.
* A stream without a channel (an answer collected in memory, or an SSE response not
  yet started) is taken at once: its credit comes back as its tokens are rendered.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from llmctl.common.errors import LlmctlError
from llmctl.common.messages import Finished
from llmctl.common.prefix import request_hashes
from llmctl.common.request import GenRequest

log = logging.getLogger(__name__)

_rids = itertools.count(1)

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


class Output(Protocol):
    """A front's rendering of one stream's events in its dialect: the bytes to write on
    the stream's channel (``None`` or ``b""``: nothing to write now)."""

    def token(self, s: "Stream", text: str) -> bytes | None: ...
    def logprobs(self, s: "Stream", content: list[dict[str, Any]]) -> bytes | None: ...
    def done(self, s: "Stream", fin: Finished) -> bytes | None: ...
    def error(self, s: "Stream", err: LlmctlError) -> bytes | None: ...


@dataclass(eq=False)
class Stream:
    request: GenRequest
    out: Output
    channel: "Channel | None" = None
    tag: int = 0                    # the front's name for it (a TCP stream id)
    rid: int = field(default_factory=lambda: next(_rids))
    t_admit: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    model: str = ""                 # the served model (its Scheduler) it was admitted to
    prefix: tuple[int, ...] = ()    # prefix hashes of its prompt (common/prefix.py)
    internal: bool = False          # a deep probe, not a client's request
    tenant: str = "default"         # who it belongs to ([[tenants]])
    t_wait: float = 0.0             # it waits for a slot since (admitted, or parked)
    slice_start: int = 0            # pieces when it last got a slot (fairness.py)
    yield_at: int = -1              # pieces when it was asked to yield its slot
    starved: bool = False           # runs now because it starved (fairness.py's room)
    bill: Any = None                # its tenant's accounts (tenants.Tenant)
    # at its worker
    worker: str | None = None       # the worker holding it, while it holds it
    attempts: int = 0
    parked: bool = False            # its worker keeps it without a slot
    park_sent: bool = False         # PARK sent, no credit granted since
    # its output
    pieces: int = 0                 # TOKEN pieces rendered for the client
    t_first: float | None = None
    t_last: float | None = None
    finished: bool = False          # it had its DONE or ERROR
    owed: int = 0                   # tokens the client took, not yet credited
    granted: int = 0                # credit given back so far
    stalled_since: float | None = None   # its token window has been spent since

    def __post_init__(self) -> None:
        self.t_wait = self.t_wait or self.t_admit
        if not self.deadline:
            self.deadline = self.t_admit + self.request.deadline_ms / 1000.0
        if not self.prefix and self.request.embed is None:
            self.prefix = request_hashes(self.request)


class Channel:
    """One client connection's output, shared by its streams.

    ``transport``: the asyncio transport (its write buffer limits at 0, so that what the
    kernel refused is visible: ``transport.limit_output``); ``drain``: waits until it
    took everything; ``frame``: wraps the bytes of one write (HTTP chunked encoding);
    ``hard_limit``: bytes that may wait in this process before the client is dropped
    (only frames without token credit can pile up: PONGs, errors)."""

    def __init__(self, core: "Crediting", transport: asyncio.WriteTransport,
                 drain: Callable[[], Awaitable[None]], hard_limit: int,
                 frame: Callable[[bytes], bytes] | None = None) -> None:
        self.core = core
        self.transport = transport
        self._drain = drain
        self.hard_limit = hard_limit
        self._frame = frame
        self.streams: dict[int, Stream] = {}     # by rid
        self._pending: list[bytes] = []
        self._tokens = False                      # pending holds credited tokens
        self._waiting: asyncio.Task | None = None  # credit waits for the client to read
        self.closed = False

    def attach(self, s: Stream) -> None:
        s.channel = self
        self.streams[s.rid] = s

    def detach(self, s: Stream) -> None:
        self.streams.pop(s.rid, None)

    def write(self, data: bytes, tokens: bool = False) -> None:
        """Queue bytes for this round's write (``flush``); ``tokens``: they carry
        credited TOKENs."""
        if not self._pending:
            self.core.dirty.append(self)
        self._pending.append(data)
        self._tokens = self._tokens or tokens

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        tokens, self._tokens = self._tokens, False
        if self.closed or self.transport.is_closing():
            return
        self.transport.write(self._frame(data) if self._frame else data)
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.hard_limit:
            log.warning("a client left %d bytes unread (more than %d): dropping it", buffered,
                        self.hard_limit)
            self.core.drop_channel(self)
            return
        if not tokens or self._waiting is not None:
            return
        if buffered:
            self._waiting = asyncio.get_running_loop().create_task(self._wait())
        else:
            self.credit()

    def credit(self) -> None:
        """The kernel took every byte: each stream's owed credit goes back, a quarter
        window at a time (fewer messages to the worker, and it never runs dry)."""
        for s in self.streams.values():
            if s.owed >= self.core.grant_batch:
                self.core.grant(s)

    async def _wait(self) -> None:
        try:
            await self._drain()
        except (ConnectionError, RuntimeError):
            return
        finally:
            self._waiting = None
        if not self.closed:
            self.credit()

    @property
    def backed_up(self) -> bool:
        return self._waiting is not None or bool(self.transport.get_write_buffer_size())

    def abort(self) -> None:
        """Close the connection at once (what it holds is lost)."""
        self.closed = True
        if self._waiting is not None:
            self._waiting.cancel()
        self._pending.clear()
        self.transport.abort()


class Crediting(Protocol):
    """What a channel needs of the core."""
    dirty: list[Channel]
    grant_batch: int

    def grant(self, s: Stream) -> None: ...
    def drop_channel(self, ch: Channel) -> None: ...
