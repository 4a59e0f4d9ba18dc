"""The CC50 framing on the binary port (dataplane/cc50.py), with a client written from the
seed's spec (common/cc50.py), on the real model: chunks, several requests on one
connection, credit_bytes, bad input, bad headers, cancellation by a closed connection,
overloaded and timeout, and a server with a token refusing it."""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from llmctl.common import cc50
from tests.service import Service, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def svc():
    s = Service(workers={"slots": 2, "probe_interval_s": 0.0},
                gateway={"max_queue": 0, "max_frame": 4096},
                generation={"deadline_ms": 20_000, "temperature": 0.0})   # greedy: repeatable
    try:
        r = s.start()
        assert r.returncode == 0, r.stdout + r.stderr
        yield s
    finally:
        s.stop()


COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,"     # greedy: counts on for long


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def client(svc: Service) -> cc50.Client:
    return await cc50.Client("127.0.0.1", svc.port).connect()


def test_a_request_streams_whole_utf8_chunks_then_done(svc):
    async def main():
        c = await client(svc)
        try:
            _, ans = c.submit("Once upon a time, in a small village by the sea,",
                              max_tokens=12)
            await ans.done.wait()
            return ans
        finally:
            await c.close()

    ans = run(main())
    assert ans.error is None and ans.chunks and 1 <= ans.tokens <= 12
    for chunk in ans.chunks:
        chunk.decode("utf-8")                 # each piece on its own is whole UTF-8
    assert ans.elapsed_us is not None and ans.text.strip()   # RESP_DONE decoded whole


def test_several_requests_on_one_connection_each_end_once(svc):
    async def main():
        c = await client(svc)
        try:
            got = [c.submit(f"Count to {n}:", max_tokens=6) for n in (3, 4)]
            await asyncio.gather(*(a.done.wait() for _, a in got))
            return got
        finally:
            await c.close()

    for _, ans in run(main()):
        assert ans.error is None and ans.tokens is not None and ans.tokens <= 6


def test_credit_bytes_stop_the_output_and_done_counts_what_went_out(svc):
    async def main():
        c = await client(svc)
        try:
            _, ans = c.submit("Tell me a long story about a dragon.", max_tokens=200,
                              credit_bytes=12)
            await ans.done.wait()
            return ans
        finally:
            await c.close()

    ans = run(main())
    assert ans.error is None
    assert sum(len(ch) for ch in ans.chunks) <= 12
    assert ans.tokens == len(ans.chunks) and ans.tokens < 200
    wait_until(svc.idle, 30, "the cut request to free its slot")


def test_bad_requests_get_resp_err_and_the_connection_serves_on(svc):
    async def main():
        c = await client(svc)
        try:
            bad_len = cc50.encode(cc50.MsgType.REQ_INFER, 7, cc50.INFER.pack(0, 0, 99) + b"hi")
            c._answers[7] = cc50.Answer()
            c.send(bad_len)
            c._answers[8] = cc50.Answer()
            c.send(cc50.encode(cc50.MsgType.REQ_INFER, 8, cc50.INFER.pack(4, 0, 2) + b"\xff\xfe"))
            c._answers[9] = cc50.Answer()
            c.send(cc50.encode(cc50.MsgType.REQ_INFER, 9, b"\x00\x01"))   # short header
            await asyncio.gather(*(c._answers[i].done.wait() for i in (7, 8, 9)))
            _, ok = c.submit("Hello", max_tokens=3)
            await ok.done.wait()
            return [c._answers[i] for i in (7, 8, 9)], ok
        finally:
            await c.close()

    bad, ok = run(main())
    assert [a.error.split(":")[0] for a in bad] == ["bad_request"] * 3
    assert "prompt_len 99" in bad[0].error and "UTF-8" in bad[1].error
    assert ok.error is None and ok.tokens


@pytest.mark.parametrize("header", [
    struct.pack("<IHHQII", cc50.MAGIC, 2, 1, 5, 0, 0),          # version 2
    struct.pack("<IHHQII", cc50.MAGIC, 1, 1, 5, 0, 1 << 20),    # over max_frame
    struct.pack("<IHHQII", cc50.MAGIC, 1, 3, 5, 0, 0),          # a server's type
])
def test_a_bad_header_is_answered_then_the_connection_closed(svc, header):
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as s:
        s.sendall(header)
        data = b""
        while chunk := s.recv(4096):          # the server closes after its answer
            data += chunk
    mtype, rid, length = cc50.decode_header(data[:cc50.HEADER.size], 1 << 20)
    assert mtype == cc50.MsgType.RESP_ERR and rid == 5
    assert data[cc50.HEADER.size:].startswith(b"protocol: ")
    assert len(data) == cc50.HEADER.size + length


def test_a_closed_connection_cancels_its_requests_and_overloaded_is_an_error(svc):
    before = svc.counters()["cancelled"]

    wait_until(svc.idle, 30, "both slots to be free")

    async def main():
        c = await client(svc)
        try:
            long = [c.submit(COUNTING, max_tokens=1500) for _ in range(2)]   # both slots
            while not all(a.chunks or a.done.is_set() for _, a in long):
                await asyncio.sleep(0.05)
            _, over = c.submit("and one more", max_tokens=4)    # max_queue 0: no room
            await over.done.wait()
            return [a for _, a in long], over
        finally:
            await c.close()

    long, over = run(main())
    assert all(a.chunks and a.error == "connection closed" for a in long)
    assert over.error.startswith("overloaded: ")
    wait_until(lambda: svc.counters()["cancelled"] >= before + 2 and svc.idle(), 30,
               "the closed connection's requests to be cancelled")


def test_a_deadline_is_an_error_with_its_code(make_service):
    """Synthetic workers (no end of text before max_tokens) and a 1 s deadline."""
    s = make_service(model={"engine": "synthetic"}, synthetic={"step_ms": 5.0},
                     generation={"deadline_ms": 1000})
    assert s.start().returncode == 0

    async def main():
        c = await cc50.Client("127.0.0.1", s.port).connect()
        try:
            _, ans = c.submit("Write a very long essay.", max_tokens=100_000)
            await ans.done.wait()
            return ans
        finally:
            await c.close()

    ans = run(main())
    assert ans.error.startswith("timeout: ") and ans.chunks


def test_a_server_with_a_token_refuses_cc50(make_service):
    s = make_service(gateway={"token": "s3cret"})
    assert s.start().returncode == 0

    async def main():
        c = await cc50.Client("127.0.0.1", s.port).connect()
        _, ans = c.submit("Hello", max_tokens=2)
        await ans.done.wait()
        await c.closed.wait()
        return ans

    ans = run(main())
    assert ans.error.startswith("unauthorized: ") and "token" in ans.error


def test_the_load_generator_drives_cc50(svc, tmp_path):
    import json
    import subprocess
    import sys

    from tests.service import ROOT

    out = tmp_path / "cc50.json"
    r = subprocess.run(
        [sys.executable, "-m", "llmctl.control", "bench", "--target", f"cc50://127.0.0.1:{svc.port}",
         "--clients", "2", "--requests", "3", "--warmup", "0", "--max-tokens", "4", "--quiet",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [point] = json.loads(out.read_text())["points"]
    assert point["summary"]["ok"] == 3 and 0 < point["summary"]["tokens_out"] <= 12
