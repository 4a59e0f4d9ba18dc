"""Token credit in the gateway's core (pure state, no sockets): what a stream's client
has taken goes back to the worker, coalesced, and early enough that it never runs dry."""
from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from llmctl.common import messages as m
from llmctl.common.config import Config
from llmctl.common.protocol import Defaults, parse_generate
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.scheduler import Request

WINDOW = 16


class Sink:
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_token(self, req: Request, text: str) -> None:
        self.tokens.append(text)

    def on_done(self, req: Request, stats: dict[str, Any]) -> None:
        pass

    def on_error(self, req: Request, err: Exception) -> None:
        pass


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


def start(gw: Gateway) -> Request:
    req = gw.submit(parse_generate(b'{"prompt": "hi", "max_tokens": 1000}', Defaults()), Sink())
    assert [w for w, _ in gw.outgoing()] == ["w0.1"]      # dispatched
    gw.wake.clear()
    return req


def tokens(gw: Gateway, req: Request, n: int) -> None:
    for _ in range(n):
        gw.on_worker("w0.1", m.Token(rid=req.rid, text="x"))


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
    a, b = start(gw), start(gw)
    tokens(gw, a, 4)
    tokens(gw, b, 4)
    gw.grant(a, 4)                  # the clients took them; the worker has 12 more each
    gw.grant(b, 4)
    assert not gw.wake.is_set()     # nothing to send yet: the credit waits
    tokens(gw, a, WINDOW // 2)      # a's worker has used half its window again
    gw.grant(a, 4)
    assert gw.wake.is_set()
    gw.wake.clear()
    assert credit_sent(gw) == {a.rid: 8, b.rid: 4}   # b's owed rides along
    assert credit_sent(gw) == {}


def test_a_stream_the_worker_paused_gets_its_credit_at_once(gw):
    a = start(gw)
    tokens(gw, a, WINDOW)           # the whole window: the worker paused it
    gw.grant(a, 1)
    assert gw.wake.is_set() and credit_sent(gw) == {a.rid: 1}


def test_every_token_is_credited_exactly_once(gw):
    a = start(gw)
    sent = 0
    for _ in range(40):             # deliver 1..3 tokens, the client takes them
        tokens(gw, a, 3)
        gw.grant(a, 3)
        if gw.wake.is_set():
            gw.wake.clear()
            sent += credit_sent(gw).get(a.rid, 0)
        assert a.pieces - sent < WINDOW          # never out of credit for what was taken
    sent += credit_sent(gw).get(a.rid, 0)
    assert sent == a.granted == 120
