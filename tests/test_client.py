"""The wire client (common/client.py) against a small scripted server: no model, no service."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import pytest

from llmctl.common import protocol as p
from llmctl.common.client import Connection, ServerError
from llmctl.common.sync_client import Client
from llmctl.common.errors import Unauthorized
from llmctl.common.protocol import FrameDecoder, FrameType


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HELLO (token "s3cret" if any), then per GENERATE, by prompt: "twice" ends twice,
    "close" closes after one piece, "die" sends a stream-0 ERROR and closes, else two
    pieces and a DONE."""
    dec = FrameDecoder(1 << 20)
    try:
        while data := await reader.read(65536):
            for f in dec.feed(data):
                if f.type is FrameType.HELLO:
                    token = p.parse_hello(f.payload).get("token")
                    if token not in (None, "s3cret"):
                        writer.write(p.error(0, Unauthorized("wrong token")))
                        return
                    writer.write(p.welcome("fake/1", "m", 1 << 20, 16))
                elif f.type is FrameType.PING:
                    writer.write(p.pong(f.payload))
                elif f.type is FrameType.GENERATE:
                    prompt = p.parse_json(f.payload)["prompt"]
                    writer.write(p.token(f.stream, "a") + p.token(f.stream, "é"))
                    if prompt == "close":
                        return
                    if prompt == "die":
                        writer.write(p.error(0, p.ProtocolError("going away")))
                        return
                    done = p.done(f.stream, {"finish_reason": "length", "completion_tokens": 2})
                    writer.write(done + (done if prompt == "twice" else b""))
            await writer.drain()
    finally:
        await writer.drain()
        writer.close()


@pytest.fixture
def port() -> Iterator[int]:
    """The scripted server on a free port, in a thread of its own."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["server"] = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    yield box["server"].sockets[0].getsockname()[1]

    async def shutdown() -> None:
        box["server"].close()
        await box["server"].wait_closed()
    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def test_blocking_client_api(port):
    with Client("127.0.0.1", port, timeout=10) as c:
        assert c.hello()["server"] == "fake/1" and c.welcome["max_streams"] == 16
        r = c.complete(1, prompt="hi", max_tokens=2)
        assert (r.text, r.pieces, r.done["completion_tokens"], r.error) == ("aé", ["a", "é"], 2, None)
        assert len(r.piece_times) == 2 and r.piece_times[0] <= r.piece_times[1] <= r.t_end
        c.generate(2, prompt="hi")
        c.generate(3, prompt="hi")
        res = c.collect({2, 3})                  # frames that came before collect() count
        assert all(x.done is not None and x.text == "aé" for x in res.values())
        c.send(p.ping(b"xy"))
        f = c.recv_frame()
        assert f.type is FrameType.PONG and f.payload == b"xy"
        assert c.ping(b"z") >= 0
        c.generate(4, prompt="close")
        with pytest.raises(ConnectionError):     # the server closed under the stream
            c.collect({4})
        with pytest.raises(ConnectionError):
            c.recv_frame()


def test_blocking_client_refusals(port):
    with Client("127.0.0.1", port, timeout=10) as c:
        with pytest.raises(ServerError) as exc:
            c.hello("wrong")
        assert exc.value.code == "unauthorized"
    with Client("127.0.0.1", port, timeout=10) as c:
        c.hello("s3cret")
        c.generate(1, prompt="die")
        with pytest.raises(ServerError) as exc:   # a stream-0 ERROR ends every stream
            c.collect({1})
        assert exc.value.code == "protocol"
        frames = list(c.frames())                 # what no stream took, then the end
        assert [(f.type, f.stream) for f in frames] == [(FrameType.ERROR, 0)]


def test_connection_counts_endings_of_ended_streams_and_cuts_on_close(port):
    async def main() -> tuple[Any, ...]:
        conn = await Connection.open("127.0.0.1", port, timeout=10)
        once = await conn.request(prompt="hi")
        twice = await conn.request(prompt="twice")
        again = await conn.request(prompt="hi")   # the second DONE of `twice` came before
        assert conn.stray_endings == 1
        cut = await conn.request(prompt="close")
        after = await conn.request(prompt="hi")   # on a closed connection: at once
        await conn.close()
        return once, twice, again, cut, after

    once, twice, again, cut, after = asyncio.run(main())
    assert once.done and twice.done and again.done and once.stream != twice.stream
    assert once.t_start <= once.piece_times[0] <= once.t_end
    assert cut.cut and cut.error["code"] == "connection_closed" and cut.text == "a" + "é"
    assert after.cut and after.error["code"] == "connection_closed" and not after.pieces
