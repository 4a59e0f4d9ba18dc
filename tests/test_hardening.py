"""Hostile and unlucky clients on the real service: nothing they send takes it down.

Each input known to poison a naive server is sent here; the worker's pid must stay the
same and the next request must be served.  Every service's
logs are scanned for exceptions when it stops (tests/service.py).
"""
from __future__ import annotations

import json
import os
import socket
import stat
import urllib.error
import urllib.request

import pytest
import zmq

from llmctl.common import protocol as p
from llmctl.common.protocol import FrameDecoder, FrameType
from tests.service import Service, wait_until

pytestmark = pytest.mark.integration

KEY = "s3cret"
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def svc():
    s = Service(workers={"count": 1, "slots": 4}, http={"enabled": True, "api_key": KEY,
                                                      "body_timeout_s": 1.0})
    r = s.start()
    assert r.returncode == 0, r.stdout + r.stderr
    yield s
    s.stop()


def worker_pid(s: Service) -> int:
    [w] = s.status()["workers"]
    return w["pid"]


def served(s: Service) -> None:
    with s.client() as c:
        r = c.complete(1, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert r.done is not None and r.done["completion_tokens"] == 4, r


def raw_generate(c, stream: int, payload: bytes) -> dict:
    c.send(p.encode_frame(FrameType.GENERATE, stream, payload))
    return c.collect({stream})[stream].error


def post(s: Service, path: str, body: bytes, key: str | None = KEY,
         headers: dict | None = None) -> tuple[int, dict]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{s.http_port}{path}", data=body, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- validation at the door ---------------------------------------------------------------

@pytest.mark.parametrize("payload, field", [
    (b'{"prompt": "ab\\ud800", "max_tokens": 4}', "prompt"),
    (b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "us\\ud800er", "content": "x"}]}', "messages[0].role"),
    (b'{"prompt": "hi", "stop": ["ok", "\\ud800"]}', "stop[1]"),
    (b'{"prompt": "hi", "stop": "\\udc80"}', "stop[0]"),
])
def test_lone_surrogates_are_bad_requests_naming_the_field(svc, payload, field):
    pid = worker_pid(svc)
    with svc.client() as c:
        err = raw_generate(c, 1, payload)
        assert err["code"] == "bad_request" and field in err["message"], err
        c.send(p.ping(b"still open"))               # the connection stays open
        assert c.recv_frame().payload == b"still open"
    assert worker_pid(svc) == pid
    served(svc)


def test_hello_token_with_a_lone_surrogate_is_unauthorized(svc):
    with svc.client(hello=False) as c:
        c.send(p.encode_frame(FrameType.HELLO, 0, b'{"version": 1, "token": "\\ud800"}'))
        f = c.recv_frame()
        assert f.type is FrameType.ERROR and f.stream == 0
        body = json.loads(f.payload)
        assert body["code"] == "unauthorized" and "token" in body["message"]
        with pytest.raises(ConnectionError):
            c.recv_frame()
    served(svc)


def test_http_surrogates_and_odd_authorization_headers(svc):
    pid = worker_pid(svc)
    status, body = post(svc, "/v1/chat/completions",
                        b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}')
    assert status == 400 and "messages[0].content" in body["error"]["message"]
    status, body = post(svc, "/v1/completions", b'{"model": "m", "prompt": "p", "stop": ["\\ud800"]}')
    assert status == 400 and body["error"]["code"] == "bad_request"
    # A header with bytes that are not ASCII: 401, never a 500.
    with socket.create_connection(("127.0.0.1", svc.http_port), timeout=10) as so:
        so.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer s3cr\xc3\xa9t\xff\r\nContent-Length: 2\r\n"
                   b"Connection: close\r\n\r\n{}")
        reply = b""
        while chunk := so.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert worker_pid(svc) == pid


def test_deep_json_is_answered_on_both_fronts(svc):
    with svc.client() as c:
        err = raw_generate(c, 1, b'{"prompt": ' + DEEP + b'}')
        assert err["code"] == "bad_request" and "nests deeper" in err["message"]
        c.send(p.ping(b"x"))
        assert c.recv_frame().type is FrameType.PONG
    with svc.client(hello=False) as c:         # HELLO: a protocol error, then closed
        c.send(p.encode_frame(FrameType.HELLO, 0, b'{"version": 1, "x": ' + DEEP + b'}'))
        f = c.recv_frame()
        assert f.type is FrameType.ERROR and json.loads(f.payload)["code"] == "protocol"
        with pytest.raises(ConnectionError):
            c.recv_frame()
    status, body = post(svc, "/v1/chat/completions", b'{"model": "m", "messages": ' + DEEP + b'}')
    assert status == 400 and "nests deeper" in body["error"]["message"]
    served(svc)


def test_http_body_sent_too_slowly_is_408(svc):
    with socket.create_connection(("127.0.0.1", svc.http_port), timeout=30) as so:
        so.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
        reply = b""
        while b"\r\n\r\n" not in reply:        # one byte a while: the server must give up
            try:
                so.sendall(b" ")
            except OSError:
                break
            so.settimeout(0.5)
            try:
                chunk = so.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    served(svc)


# ---- files --------------------------------------------------------------------------------

def test_run_dir_sockets_and_logs_are_private_whatever_the_umask(make_service):
    s = make_service()
    old = os.umask(0)              # the most permissive: llmctl must not rely on it
    try:
        assert s.start().returncode == 0
    finally:
        os.umask(old)
    run = s.dir / "run"
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(run) == 0o700 and mode(run / "logs") == 0o700
    for name in ("control.sock", "link.sock", "workers.sock", "supervisor.pid"):
        assert mode(run / name) == 0o600, name
    logs = list((run / "logs").iterdir())
    assert {"supervisor.log", "gateway.log", "w0.log"} <= {x.name for x in logs}
    for log in logs:
        assert mode(log) == 0o600, log.name


# ---- clients that stop reading ------------------------------------------------------------

def non_reader(port: int, prompt: str, max_tokens: int = 1500) -> socket.socket:
    """A client that sends one GENERATE and never reads (a small receive buffer, so that
    its kernel stops taking bytes soon)."""
    so = socket.socket()
    so.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    so.connect(("127.0.0.1", port))
    so.sendall(p.hello() + p.generate(1, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      deadline_ms=600_000))
    return so


def read_stream(so: socket.socket, stream: int, timeout: float) -> tuple[str, dict, str]:
    """(text, end payload, end type) of ``stream``, read to its DONE or ERROR."""
    so.settimeout(timeout)
    dec = FrameDecoder(1 << 24, allowed=p.SERVER_TYPES)
    text = ""
    while True:
        data = so.recv(65536)
        assert data, "the server closed the connection"
        for f in dec.feed(data):
            if f.stream != stream:
                continue
            if f.type is FrameType.TOKEN:
                text += f.payload.decode("utf-8")
            elif f.type in (FrameType.DONE, FrameType.ERROR):
                return text, json.loads(f.payload), f.type.name


def counting(i: int) -> str:
    return ", ".join(f"{i}{k}" for k in range(1, 6)) + ","   # greedy: counts on for long


def test_fifty_non_reading_clients_do_not_hold_the_slots(make_service):
    # What is tested is the gateway's parking, not the model: synthetic workers fill 50
    # clients' kernel buffers in seconds where the model took minutes.  Parking on the
    # real model (its KV kept and restored) is the next-but-one test.
    s = make_service(model={"engine": "synthetic"}, synthetic={"step_ms": 0.2},
                     workers={"count": 1, "slots": 8},
                     gateway={"park_after_s": 0.5, "slow_client_timeout_s": 600.0,
                              "max_queue": 64})
    assert s.start().returncode == 0
    pid = worker_pid(s)
    stuck = [non_reader(s.port, counting(i)) for i in range(50)]
    try:
        # Each one generates until its kernel and its token window are full, then is
        # parked: its slot serves the next one.  A parked stream whose kernel buffer takes
        # more (the receive window grows) resumes and is parked again, so what is waited
        # for is the state: all 50 parked at once, every slot free, though none ended.
        def all_parked() -> bool:
            gw = s.status()["gateway"]
            return gw["parked"] == 50 and gw["inflight"] == 0

        wait_until(all_parked, 600, "the 50 non-reading streams to be parked, no slot held")
        # Well-behaved clients are served at once, beside 50 open, stalled streams.
        with s.client() as c:
            for k in range(8):
                c.generate(k + 1, prompt=f"Question {k}: what is", max_tokens=16, temperature=0)
            results = c.collect(set(range(1, 9)))
        assert all(r.done is not None and r.done["completion_tokens"] > 0
                   for r in results.values()), results
        assert worker_pid(s) == pid
        assert s.status()["gateway"]["errors"].get("timeout", 0) == 0
    finally:
        for so in stuck:
            so.close()
    wait_until(s.idle, 60, "the closed connections' streams to be cancelled")


def test_a_stalled_stream_is_cancelled_with_slow_client(make_service):
    s = make_service(workers={"count": 1, "slots": 2},
                     gateway={"park_after_s": 0.5, "slow_client_timeout_s": 2.0})
    assert s.start().returncode == 0
    so = non_reader(s.port, counting(7))
    try:
        wait_until(lambda: s.status()["gateway"]["errors"].get("slow_client", 0) == 1, 300,
                   "the stalled stream to be cancelled")
        st = s.status()
        assert st["gateway"]["counters"]["slow_clients"] == 1 and s.idle()
        # The client, reading at last, finds its tokens, then the reason.
        text, end, kind = read_stream(so, 1, timeout=120)
        assert kind == "ERROR" and end["code"] == "slow_client", (kind, end)
        assert text.startswith(" 7")
    finally:
        so.close()
    served(s)


def test_a_parked_stream_resumes_with_the_same_output(make_service):
    s = make_service(workers={"count": 1, "slots": 1},
                     gateway={"park_after_s": 0.3, "slow_client_timeout_s": 600.0})
    assert s.start().returncode == 0
    prompt, n = counting(3), 400
    with s.client() as c:
        reference = c.complete(1, prompt=prompt, max_tokens=n, temperature=0)
    assert reference.done["completion_tokens"] == n
    so = non_reader(s.port, prompt, max_tokens=n)
    try:
        wait_until(lambda: s.status()["gateway"]["counters"]["parked"] >= 1, 300, "parking")
        # Another request takes the only slot meanwhile: the parked KV goes to the host
        # store and comes back on resume.
        with s.client() as c:
            other = c.complete(1, prompt="The history of tea", max_tokens=8, temperature=0)
        assert other.done is not None
        text, end, kind = read_stream(so, 1, timeout=300)
    finally:
        so.close()
    assert kind == "DONE" and end["completion_tokens"] == n, end
    assert text == reference.text
    counters = s.status()["gateway"]["counters"]
    assert counters["resumed"] >= 1 and counters["slow_clients"] == 0


# ---- the internal sockets --------------------------------------------------------------------

GARBAGE_FROM_A_WORKER = [
    [b"Z", b"", b""],                                   # an unknown kind
    [b"R", b"", b"{not json"],                          # READY that is not JSON
    [b"R", b"", b'{"worker": "x"}'],                    # READY without its fields
    [b"R", b"", b'{"worker": "x", "pid": "one", "slots": 2}'],   # a wrong type
    [b"M", b"", b"\x54\x00\x00"],                       # a truncated BATCH
    [b"G", b"\x00" * 8, b"{}"],                         # a kind workers never send
    [b"T", b"\x00\x01", b"x"],                          # a request id of 2 bytes
    [b"D"],                                             # one frame
]


def test_the_gateway_drops_garbage_from_a_worker_and_serves_on(svc):
    gw_pid = svc.status()["gateway"]["pid"]
    before = svc.counters()["dropped_messages"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"impostor.1")
    try:
        sock.connect(f"ipc://{svc.dir / 'run' / 'workers.sock'}")
        for frames in GARBAGE_FROM_A_WORKER:
            sock.send_multipart(frames)
        wait_until(lambda: svc.counters()["dropped_messages"] >= before + 5, 10,
                   "the malformed messages to be counted")
    finally:
        sock.close(linger=0)
        ctx.term()
    st = svc.status()
    assert st["gateway"]["pid"] == gw_pid and len(st["workers"]) == 1
    served(svc)
