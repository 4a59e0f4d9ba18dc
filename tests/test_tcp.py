"""The binary protocol's front (dataplane/tcp.py) on the real model, end to end through the
gateway and two workers: the handshake, interleaved streams, stop strings and seeds,
PING, bad requests, stream limits, a token, and a closed connection freeing its worker."""
from __future__ import annotations

import json
import socket
import struct

import pytest

from llmctl.common import protocol as p
from llmctl.common.protocol import FrameType
from tests.service import Service, wait_until
from llmctl.common.client import ServerError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def svc():
    s = Service(workers={"count": 2}, gateway={"max_streams": 4})
    r = s.start()
    assert r.returncode == 0, r.stdout + r.stderr
    yield s
    s.stop()


def expect_close_with_error(c, code: str) -> None:
    f = c.recv_frame()
    assert f.type is FrameType.ERROR and f.stream == 0, f
    assert json.loads(f.payload)["code"] == code
    with pytest.raises(ConnectionError):
        c.recv_frame()


def test_welcome(svc):
    with svc.client(hello=False) as c:
        w = c.hello()
    assert w["version"] == 1 and w["max_frame"] == 1 << 20 and w["max_streams"] == 4
    assert "SmolLM2" in w["model"] and w["server"].startswith("llmctl/")


def test_interleaved_streams_and_temperature_zero_determinism(svc):
    prompt = "The three primary colors are"
    with svc.client() as c:
        c.generate(1, prompt=prompt, max_tokens=24, temperature=0.0)
        c.generate(2, prompt=prompt, max_tokens=24, temperature=0.0)
        c.generate(3, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
                   temperature=0.0)
        res = c.collect({1, 2, 3})
        again = c.complete(5, prompt=prompt, max_tokens=24, temperature=0.0)
    for r in res.values():
        assert r.error is None, r.error
        d = r.done
        assert d["finish_reason"] in ("stop", "length") and d["prompt_tokens"] > 0
        assert 0 < d["completion_tokens"] <= 24 and d["worker"] in ("w0", "w1")
        assert d["ttft_ms"] <= d["total_ms"] and r.text
    assert res[1].text == res[2].text == again.text
    assert res[1].done["completion_tokens"] == 24 and res[1].done["finish_reason"] == "length"


def test_stop_strings_and_seeded_sampling(svc):
    with svc.client() as c:
        a = c.complete(1, prompt="Count: one, two, three, four,", max_tokens=20, temperature=0.9,
                       seed=42)
        b = c.complete(1, prompt="Count: one, two, three, four,", max_tokens=20, temperature=0.9,
                       seed=42)
        s = c.complete(1, prompt="Count: one, two, three, four,", max_tokens=40,
                       temperature=0.0, stop=[","])
    assert a.text == b.text and a.done and b.done
    assert "," not in s.text and s.done["finish_reason"] == "stop"


def test_ping_pong(svc):
    with svc.client() as c:
        c.send(p.ping(b"\x00abc\xff"))
        f = c.recv_frame()
        assert f.type is FrameType.PONG and f.stream == 0 and f.payload == b"\x00abc\xff"
        c.send(p.ping(b"x" * 65))
        expect_close_with_error(c, "protocol")


def test_bad_requests_keep_the_connection(svc):
    with svc.client() as c:
        c.send(p.encode_frame(FrameType.GENERATE, 1, b"{not json"))
        c.generate(2, prompt="a", messages=[{"role": "user", "content": "b"}])
        c.generate(3, prompt="x", max_tokens=-1)
        c.generate(4, prompt="word " * 3000, max_tokens=4)          # longer than n_ctx
        res = c.collect({1, 2, 3, 4})
        assert all(r.error and r.error["code"] == "bad_request" for r in res.values()), res
        assert "context" in res[4].error["message"]
        ok = c.complete(5, prompt="Hello", max_tokens=4, temperature=0.0)
        assert ok.done and ok.done["completion_tokens"] == 4


def test_duplicate_stream_and_too_many_streams(svc):
    count = "Count from 1 to 500, one number per line:\n1\n2\n3\n"
    with svc.client() as c:
        # Streams 1-4 are long answers, open until the refusals have come back (then
        # cancelled): however slow this client is, four streams are open when 9 arrives.
        for s in (1, 2, 3, 4):
            c.generate(s, prompt=count, max_tokens=1000, temperature=0.0)
        c.generate(1, prompt="dup", max_tokens=8)       # stream 1 is open
        c.generate(9, prompt="fifth", max_tokens=8)     # max_streams = 4
        ends: dict[int, list[str]] = {}
        cancelled = False
        while sorted(ends) != [1, 2, 3, 4, 9] or len(ends[1]) < 2:
            if not cancelled and 9 in ends and ends.get(1) == ["bad_request"]:
                for s in (1, 2, 3, 4):
                    c.send(p.cancel(s))
                cancelled = True
            f = c.recv_frame()
            if f.type is FrameType.DONE:
                ends.setdefault(f.stream, []).append("done")
            elif f.type is FrameType.ERROR:
                ends.setdefault(f.stream, []).append(json.loads(f.payload)["code"])
    # The duplicate is refused on its stream; the original stream 1 still ends once.
    assert sorted(ends[1]) == ["bad_request", "done"]
    assert ends[9] == ["too_many_streams"]
    assert ends[2] == ends[3] == ends[4] == ["done"]


def test_bad_input_is_refused_while_others_are_served(svc):
    with svc.client() as good:
        good.generate(1, prompt="Once upon a time", max_tokens=48, temperature=0.0)

        with svc.client(hello=False) as c:      # over max_frame: refused before the payload
            c.send(struct.pack(">I", (1 << 20) + 1) + bytes([FrameType.HELLO]))
            expect_close_with_error(c, "too_large")
        with svc.client(hello=False) as c:      # HTTP on the TCP port
            c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            expect_close_with_error(c, "too_large")
        with svc.client(hello=False) as c:      # length below 5
            c.send(b"\x00\x00\x00\x02\x01\x00")
            expect_close_with_error(c, "protocol")
        with svc.client(hello=False) as c:      # not HELLO first
            c.send(p.generate(1, prompt="hi"))
            expect_close_with_error(c, "protocol")
        with svc.client(hello=False) as c:      # unsupported version
            c.send(p.encode_frame(FrameType.HELLO, 0, b'{"version": 2}'))
            expect_close_with_error(c, "protocol")
        with svc.client() as c:                 # unknown type after the handshake
            c.send(p.encode_frame(0x7E, 0, b""))
            expect_close_with_error(c, "protocol")
        with svc.client() as c:                 # a payload that does not parse
            c.send(p.encode_frame(FrameType.HELLO, 0, b"{}"))
            expect_close_with_error(c, "protocol")
        with svc.client(hello=False, timeout=30) as c:   # no HELLO: the server closes it
            with pytest.raises(ConnectionError):         # (the client's timeout would be a
                c.recv_frame()                           # TimeoutError)

        r = good.collect({1})[1]
        assert r.error is None and r.done["completion_tokens"] == 48


def test_token_required_when_configured(make_service):
    s = make_service(gateway={"token": "s3cret"})
    assert s.start().returncode == 0
    with s.client(hello=False) as c:
        with pytest.raises(ServerError) as exc:
            c.hello()
        assert exc.value.code == "unauthorized"
    with s.client(hello=False) as c:
        c.hello(token="s3cret")
        assert c.complete(1, prompt="Hi", max_tokens=2).done is not None


def test_closing_the_connection_frees_the_worker(svc):
    c = svc.client()
    c.generate(1, prompt="Once upon a time", max_tokens=400, temperature=0.0)
    f = c.recv_frame()
    assert f.type is FrameType.TOKEN
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()

    wait_until(svc.idle, 10.0, "the cancelled request to leave its worker")
