"""The gateway's worker link on real ZeroMQ sockets (no processes): the ROUTER read from
the loop's reader callback, and sends that wait, losing nothing, while a worker's pipe
is full."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq
import zmq.asyncio

from llmctl.common import messages as m
from llmctl.dataplane.link import WorkerRouter


class FakeGateway:
    """What the link hands its messages to."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []
        self.flushes = 0
        self.lost: list[str] = []

    def on_worker(self, wid: str, msg: Any) -> None:
        self.got.append((wid, msg))

    def flush(self) -> None:
        self.flushes += 1

    def worker_lost(self, wid: str, why: str, tell: bool = True) -> None:
        self.lost.append(wid)


async def until(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
def pair(request):
    """A link whose ROUTER is bound on loopback, and a worker's DEALER connected to it
    (``@pytest.mark.sndhwm(N)``: the ROUTER's send high-water mark)."""
    ctx = zmq.asyncio.Context()
    gw = FakeGateway()
    link = WorkerRouter(gw, ctx)  # type: ignore[arg-type]
    link.router = link._router()
    hwm = request.node.get_closest_marker("sndhwm")
    if hwm is not None:
        link.router.setsockopt(zmq.SNDHWM, hwm.args[0])
    port = link.router.bind_to_random_port("tcp://127.0.0.1")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"w0.1")
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield link, gw, dealer
    dealer.close(linger=0)
    link.close()
    ctx.term()


def test_every_message_reaches_the_core_before_and_after_the_reader_starts(pair):
    link, gw, dealer = pair

    async def run() -> None:
        for _ in range(3):                      # queued before the reader exists
            dealer.send_multipart(m.encode(m.Kind.HEARTBEAT))
        await asyncio.sleep(0.1)                # let them reach the ROUTER's queue
        task = asyncio.ensure_future(link._receiver(link.router, False))
        await until(lambda: len(gw.got) == 3)
        for _ in range(200):                    # more than one round (ROUND_MAX)
            dealer.send_multipart(m.encode(m.Kind.HEARTBEAT))
        await until(lambda: len(gw.got) == 203)
        dealer.send_multipart([b"garbage"])     # dropped and counted by the link, no crash
        dealer.send_multipart(m.encode(m.Kind.BYE))
        await until(lambda: len(gw.got) == 204)
        assert not task.done() and gw.flushes >= 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    gw.counters = type("C", (), {"dropped_messages": 0})()
    asyncio.run(run())
    assert all(w == "w0.1" for w, _ in gw.got)
    assert [type(x).__name__ for _, x in gw.got[-1:]] == ["Bye"]
    assert gw.counters.dropped_messages == 1


@pytest.mark.sndhwm(2)
def test_a_send_to_a_full_pipe_waits_and_loses_nothing(pair):
    link, gw, dealer = pair
    big = b"x" * 200_000

    async def run() -> None:
        dealer.send_multipart(m.encode(m.Kind.HEARTBEAT))     # the ROUTER learns w0.1
        task = asyncio.ensure_future(link._receiver(link.router, False))
        await until(lambda: len(gw.got) == 1)
        sent = 0
        while True:                       # fill the pipe and the kernel's buffers
            send = asyncio.ensure_future(link._route("w0.1", [sent.to_bytes(4, "big"), big]))
            await asyncio.sleep(0.02)
            if not send.done():
                break                     # this one waits for room
            sent += 1
            assert sent < 200, "the pipe never filled"
        got = []
        while len(got) < sent + 1:        # the worker reads: the waiting send goes out
            if dealer.poll(100):
                got.append(int.from_bytes(dealer.recv_multipart()[0], "big"))
            await asyncio.sleep(0)
        await asyncio.wait_for(send, 10)
        assert got == list(range(sent + 1)) and not gw.lost
        task.cancel()

    asyncio.run(run())


def test_a_send_to_a_worker_that_is_gone_drops_it(pair):
    link, gw, dealer = pair

    async def run() -> None:
        await link._route("w9.9", [b"hello"])      # never connected: unroutable

    asyncio.run(run())
    assert gw.lost == ["w9.9"]
