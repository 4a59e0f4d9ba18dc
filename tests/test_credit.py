"""Token credit in the stream core (gateway.py, streams.py; no sockets): what a stream's
client has taken goes back to the worker, coalesced, early enough that it never runs dry,
and not before the client's connection took it."""
from __future__ import annotations

import asyncio

import msgspec
import pytest

from llmctl.common import messages as m
from llmctl.common.config import Config
from llmctl.common.request import GenRequest
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.streams import Channel, Stream
from tests.fakes import Recorder

WINDOW = 16


class Transport:
    """An asyncio transport whose kernel takes everything, or nothing (``refuse``)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.buffered = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data
        if self.refusing:
            self.buffered += len(data)

    refusing = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class Out(Recorder):
    """Renders a token as its text (a front's output)."""

    def token(self, s, text):
        super().token(s, text)
        return text.encode()


@pytest.fixture
def gw():
    loop = asyncio.new_event_loop()         # the Gateway's asyncio objects want one
    asyncio.set_event_loop(loop)
    c = Config()
    g = Gateway(msgspec.structs.replace(c, gateway=msgspec.structs.replace(
        c.gateway, token_window=WINDOW)))
    g.on_worker("w0.1", m.Ready(m.ReadyInfo(worker="w0.1", pid=1, slots=2, name="w0",
                                            served=g.model_name)))
    yield g
    asyncio.set_event_loop(None)
    loop.close()


def channel(gw: Gateway) -> tuple[Channel, Transport, asyncio.Event]:
    t, drained = Transport(), asyncio.Event()
    return Channel(gw, t, drained.wait, 1 << 20), t, drained   # type: ignore[arg-type]


def start(gw: Gateway, ch: Channel | None) -> Stream:
    s = gw.open(GenRequest(prompt="hi", max_tokens=1000), Out(), ch)
    assert [w for w, _ in gw.outgoing()] == ["w0.1"]      # dispatched
    gw.wake.clear()
    return s


def tokens(gw: Gateway, s: Stream, n: int) -> None:
    """``n`` tokens from the worker, each round flushed (the client's kernel takes them
    unless the transport refuses)."""
    for _ in range(n):
        gw.on_worker("w0.1", m.Token(rid=s.rid, text="x"))
        gw.flush()


def credit_sent(gw: Gateway) -> dict[int, int]:
    grants: dict[int, int] = {}
    for wid, frames in gw.outgoing():
        msg = m.from_gateway(frames)
        if isinstance(msg, m.Credit):
            assert wid == "w0.1"
            for rid, n in msg.grants:
                grants[rid] = grants.get(rid, 0) + n
    return grants


def test_credit_waits_until_half_the_window_is_used_then_goes_in_one_message(gw):
    ch, _, _ = channel(gw)
    a, b = start(gw, ch), start(gw, ch)
    tokens(gw, a, 4)
    tokens(gw, b, 4)                # taken: a quarter window each is credited ...
    assert (a.granted, b.granted) == (4, 4)
    assert not gw.wake.is_set()     # ... but the message waits: the worker has 12 more each
    tokens(gw, a, WINDOW // 2)      # a's worker has used half its window again
    assert gw.wake.is_set()
    gw.wake.clear()
    assert credit_sent(gw) == {a.rid: 12, b.rid: 4}   # b's owed rides along
    assert credit_sent(gw) == {}


def test_a_stream_the_worker_paused_gets_its_credit_at_once(gw):
    async def run() -> None:        # the channel waits for the drain on the running loop
        ch, t, drained = channel(gw)
        a = start(gw, ch)
        t.refusing = True           # the client reads nothing: no credit
        tokens(gw, a, WINDOW)       # the whole window: the worker paused it
        assert a.granted == 0 and a.stalled_since is not None and ch.backed_up
        t.buffered, t.refusing = 0, False
        drained.set()               # the client read it all
        await asyncio.sleep(0)
        assert a.granted == WINDOW and a.stalled_since is None
        assert gw.wake.is_set() and credit_sent(gw) == {a.rid: WINDOW}

    asyncio.get_event_loop().run_until_complete(run())


def test_every_token_is_credited_exactly_once(gw):
    ch, _, _ = channel(gw)
    a = start(gw, ch)
    sent = 0
    for _ in range(40):             # 1..3 tokens a round, the client takes them
        tokens(gw, a, 3)
        if gw.wake.is_set():
            gw.wake.clear()
            sent += credit_sent(gw).get(a.rid, 0)
        assert a.pieces - sent < WINDOW          # never out of credit for what was taken
    sent += credit_sent(gw).get(a.rid, 0)
    assert sent == a.granted == 120 - a.owed and a.owed < WINDOW // 4


def test_a_collected_answer_is_taken_at_once(gw):
    a = start(gw, None)             # no channel: the front keeps the text in memory
    tokens(gw, a, WINDOW)
    assert a.granted == WINDOW and a.stalled_since is None


def test_a_client_that_leaves_too_much_unread_is_dropped(gw):
    t, drained = Transport(), asyncio.Event()
    ch = Channel(gw, t, drained.wait, hard_limit=10)   # type: ignore[arg-type]
    a = start(gw, ch)
    t.refusing = True
    ch.write(b"x" * 11)             # bytes without credit (a PONG, an error) pile up
    ch.flush()
    assert t.aborted and a.finished and gw.counters.slow_clients == 1
