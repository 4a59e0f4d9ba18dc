"""Data plane flow control on the real model: admission, cancellation, deadlines,
slow readers.  Every accepted GENERATE ends in exactly one DONE or ERROR."""
from __future__ import annotations

import json
import socket
import uuid

import psutil
import pytest

from llmctl.common import protocol as p
from llmctl.common.protocol import FrameType
from tests.service import Service, wait_until

pytestmark = pytest.mark.integration

LONG = {"prompt": "Once upon a time", "temperature": 0.0}   # runs to max_tokens


@pytest.fixture(scope="module")
def one_slot():
    """One worker, one slot, a queue of two: easy to fill."""
    s = Service(model={"n_ctx": 2048, "n_batch": 16},
                gateway={"max_queue": 2, "max_streams": 16})
    r = s.start()
    assert r.returncode == 0, r.stdout + r.stderr
    yield s
    s.stop()


def ends_of(c, streams: set[int]) -> dict[int, list[dict]]:
    """Read until each stream has ended; returns every ending seen per stream."""
    ends: dict[int, list[dict]] = {}
    while not streams <= set(ends):
        f = c.recv_frame()
        if f.type in (FrameType.DONE, FrameType.ERROR) and f.stream:
            body = json.loads(f.payload)
            body["_type"] = f.type.name
            ends.setdefault(f.stream, []).append(body)
    return ends


def test_overload_answers_at_once_and_the_rest_complete(one_slot):
    with one_slot.client() as c:
        for s in range(1, 9):
            c.generate(s, max_tokens=64, **LONG)
        ends = ends_of(c, set(range(1, 9)))
    assert all(len(v) == 1 for v in ends.values()), ends        # exactly one end each
    kinds = [v[0].get("code", v[0].get("finish_reason")) for v in ends.values()]
    overloaded = [v[0] for v in ends.values() if v[0].get("code") == "overloaded"]
    assert len(overloaded) >= 1 and kinds.count("length") >= 3
    assert kinds.count("length") + len(overloaded) == 8, kinds
    for o in overloaded:
        assert isinstance(o["retry_after_ms"], int) and o["retry_after_ms"] > 0
    wait_until(one_slot.idle, 10, "idle")


def test_cancel_while_queued(one_slot):
    before = one_slot.counters()
    with one_slot.client() as c:
        c.generate(1, max_tokens=400, **LONG)
        assert c.recv_frame().type is FrameType.TOKEN               # stream 1 runs
        c.generate(2, max_tokens=8, **LONG)
        wait_until(lambda: one_slot.status()["gateway"]["queue"] == 1, 10, "stream 2 queued")
        c.send(p.cancel(2))
        c.send(p.cancel(2))                                          # a second CANCEL is ignored
        ends = ends_of(c, {2})
        assert ends[2] == [dict(ends[2][0])] and ends[2][0]["finish_reason"] == "cancelled"
        assert 1 not in ends                                         # stream 1 still running
        c.send(p.cancel(1))
        ends = ends_of(c, {1})
        assert ends[1][0]["finish_reason"] == "cancelled"
    after = one_slot.counters()
    assert after["cancelled_queued"] == before["cancelled_queued"] + 1
    assert after["dispatched"] == before["dispatched"] + 1            # 2 never reached a worker
    wait_until(one_slot.idle, 10, "idle")


def test_cancel_during_prefill_of_a_long_prompt(one_slot):
    before = one_slot.counters()
    # ~1500 tokens, unique so no prefix cache helps; prefill runs in chunks of 16.
    prompt = f"{uuid.uuid4()} " + " ".join(f"item {i} is blue;" for i in range(200))
    with one_slot.client() as c:
        c.generate(1, prompt=prompt, max_tokens=4, temperature=0.0)
        wait_until(lambda: one_slot.status()["workers"][0]["inflight"] == 1, 10, "dispatch")
        c.send(p.cancel(1))
        ends = ends_of(c, {1})
        assert ends[1][0]["finish_reason"] == "cancelled"
        assert ends[1][0]["completion_tokens"] == 0
        wait_until(lambda: one_slot.counters()["cancelled_prefill"] > before["cancelled_prefill"],
                   10, "the worker to stop in prefill")
        # The credit came back: the slot serves the next request.
        ok = c.complete(2, prompt="Hello", max_tokens=3, temperature=0.0)
        assert ok.done and ok.done["completion_tokens"] == 3


def test_cancel_mid_decode(one_slot):
    before = one_slot.counters()
    with one_slot.client() as c:
        c.generate(1, max_tokens=1000, **LONG)
        for _ in range(3):
            assert c.recv_frame().type is FrameType.TOKEN
        c.send(p.cancel(1))
        [end] = ends_of(c, {1})[1]
        assert end["_type"] == "DONE" and end["finish_reason"] == "cancelled"
        assert end["completion_tokens"] >= 3
    wait_until(lambda: one_slot.counters()["cancelled_decode"] > before["cancelled_decode"],
               10, "the worker to stop decoding")
    wait_until(one_slot.idle, 10, "idle")


def test_deadline_while_queued_never_reaches_a_worker(one_slot):
    before = one_slot.counters()
    with one_slot.client() as c:
        c.generate(1, max_tokens=1000, **LONG)
        assert c.recv_frame().type is FrameType.TOKEN
        c.generate(2, max_tokens=8, deadline_ms=300, **LONG)
        ends = ends_of(c, {2})
        assert ends[2][0]["code"] == "timeout" and 1 not in ends
        c.send(p.cancel(1))
        ends_of(c, {1})
    after = one_slot.counters()
    assert after["expired_queued"] == before["expired_queued"] + 1
    assert after["dispatched"] == before["dispatched"] + 1


def test_deadline_while_running_stops_the_worker(one_slot):
    before = one_slot.counters()
    with one_slot.client() as c:
        c.generate(1, max_tokens=1500, deadline_ms=800, **LONG)
        [end] = ends_of(c, {1})[1]
        assert end["_type"] == "ERROR" and end["code"] == "timeout"
        wait_until(one_slot.idle, 10, "the worker to drop the expired request")
        ok = c.complete(2, prompt="Hi", max_tokens=2, temperature=0.0)
        assert ok.done is not None
    assert one_slot.counters()["expired_running"] == before["expired_running"] + 1


def test_slow_reader_does_not_hurt_others(make_service):
    s = make_service(model={"n_ctx": 2048}, workers={"count": 2},
                     gateway={"write_buffer_bytes": 1024, "slow_client_timeout_s": 2.0,
                              "token_window": 8})
    assert s.start().returncode == 0
    gw = psutil.Process(s.status()["gateway"]["pid"])
    rss_before = gw.memory_info().rss

    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.connect(("127.0.0.1", s.port))
    slow.sendall(p.hello("slow/1.0"))
    slow.sendall(p.generate(1, max_tokens=1900, **LONG))      # and never read again
    try:
        wait_until(lambda: s.status()["gateway"]["inflight"] == 1, 10, "the slow stream to run")
        with s.client() as good:
            r = good.complete(1, prompt="The capital of France is", max_tokens=32,
                              temperature=0.0)
        assert r.error is None and r.done["completion_tokens"] == 32
        wait_until(lambda: s.counters()["slow_clients"] == 1, 60,
                   "the stuck stream to be ended")
        wait_until(s.idle, 10, "its stream to be cancelled on the worker")
        assert s.status()["gateway"]["errors"]["slow_client"] == 1    # and the client told why
        growth = gw.memory_info().rss - rss_before
        assert growth < 32 * 1024 * 1024, f"gateway RSS grew by {growth} bytes"
    finally:
        slow.close()
