"""The synthetic engine ([model] engine = "synthetic"): the worker's protocol without a model.

Unit tests drive the engine as the worker does; the integration tests run the whole
service on it (no model load, so they are quick) and check what a client sees: every
stream ends exactly once, in order, with the text and counts the engine made.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import msgspec
import pytest
from llmctl.common import protocol as p
from llmctl.common.config import SyntheticConfig
from llmctl.common.errors import BadRequest
from llmctl.common.request import ChatMessage, GenRequest
from llmctl.worker.synthetic import SyntheticEngine

from tests.service import ROOT, Service, wait_until


def engine(slots: int = 4, **cfg) -> SyntheticEngine:
    return SyntheticEngine(SyntheticConfig(step_ms=0.0, **cfg), n_ctx=512, slots=slots)


def run(e: SyntheticEngine, steps: int = 10_000) -> tuple[dict[int, str], dict[int, dict]]:
    """Step until nothing runs: the text and the DONE stats of every request."""
    text: dict[int, str] = {}
    done: dict[int, dict] = {}
    for _ in range(steps):
        if not e.running:
            break
        for ev in e.step():
            text[ev.rid] = text.get(ev.rid, "") + ev.text
            if ev.done is not None:
                assert ev.rid not in done, "a request ended twice"
                done[ev.rid] = msgspec.structs.asdict(ev.done)
    return text, done


def test_tokens_until_max_tokens_then_done_with_stats():
    e = engine()
    e.start(e.prepare(1, GenRequest(prompt="x" * 40, max_tokens=7)))
    e.start(e.prepare(2, GenRequest(prompt="hello", max_tokens=3)))
    text, done = run(e)
    assert text == {1: " tok" * 7, 2: " tok" * 3}
    assert done[1]["finish_reason"] == "length" and done[1]["completion_tokens"] == 7
    assert done[1]["prompt_tokens"] == 10 and done[1]["phase"] == "decode"
    assert done[2]["completion_tokens"] == 3
    assert e.free_slots == 4


def test_stop_string_ends_the_sequence_and_is_not_sent():
    e = engine(piece="ab")
    e.start(e.prepare(1, GenRequest(prompt="p", max_tokens=50, stop=("ba",))))
    text, done = run(e)
    assert text[1] == "a" and done[1]["finish_reason"] == "stop"


def test_chat_messages_are_a_prompt():
    e = engine()
    seq = e.prepare(1, GenRequest(messages=(ChatMessage(role="user", content="hi " * 20),),
                                   max_tokens=2))
    assert seq.n_prompt > 1


def test_the_token_window_pauses_a_sequence_until_credit_comes():
    e = engine()
    e.start(e.prepare(1, GenRequest(prompt="p", max_tokens=10, window=3)))
    tokens = [ev for _ in range(20) for ev in e.step() if ev.text]
    assert len(tokens) == 3 and not e.runnable
    e.grant(1, 2)
    assert e.runnable
    tokens = [ev for _ in range(20) for ev in e.step() if ev.text]
    assert len(tokens) == 2


def test_cancel_in_decode_and_park_resume():
    e = engine(slots=1)
    e.start(e.prepare(1, GenRequest(prompt="p", max_tokens=100, window=2)))
    for _ in range(5):
        e.step()
    assert e.park(1) and e.free_slots == 1 and not e.running
    e.resume(1)
    e.grant(1, 1)
    assert [ev.text for ev in e.step()] == [" tok"]
    end = e.cancel(1)
    assert end is not None and end.done.finish_reason == "cancelled"
    assert end.done.completion_tokens == 3
    assert e.cancel(1) is None and e.free_slots == 1


def test_stamped_tokens_carry_their_time():
    e = engine(stamp=True)
    e.start(e.prepare(1, GenRequest(prompt="p", max_tokens=3)))
    text, _ = run(e)
    stamps = [int(w) for w in text[1].split()]
    assert len(stamps) == 3 and stamps == sorted(stamps)


def test_a_prompt_longer_than_the_context_is_a_bad_request():
    with pytest.raises(BadRequest):
        engine().prepare(1, GenRequest(prompt="x" * 4 * 600, max_tokens=1))


# ---- the service on synthetic workers --------------------------------------------------

@pytest.fixture
def synthetic():
    svc = Service(model={"engine": "synthetic"}, workers={"count": 2, "slots": 8},
                  http={"enabled": True}, synthetic={"step_ms": 0.2, "piece": " x"})
    r = svc.start()
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield svc
    finally:
        svc.stop()


@pytest.mark.integration
def test_many_streams_end_exactly_once_with_their_text(synthetic):
    clients = [synthetic.client() for _ in range(4)]
    try:
        for i, c in enumerate(clients):          # 4 connections x 16 streams
            for s in range(1, 17):
                c.generate(s, prompt=f"stream {s}", max_tokens=20 + s + i)
        for i, c in enumerate(clients):
            results = c.collect(range(1, 17))
            for s, res in results.items():
                n = 20 + s + i
                assert res.done is not None, res.error
                assert res.done["completion_tokens"] == n and res.text == " x" * n
                assert len(res.pieces) == n
        assert sum(c.connection.stray_endings for c in clients) == 0
    finally:
        for c in clients:
            c.close()
    st = synthetic.status()
    assert st["gateway"]["counters"]["admitted"] == 64
    assert {w["device"] for w in st["workers"]} == {"synthetic"}


@pytest.mark.integration
def test_cancel_mid_stream_and_http_both_ways(synthetic):
    with synthetic.client() as c:
        c.generate(1, prompt="long", max_tokens=4000)
        c.recv_frame()                            # the first TOKEN: it is generating
        c.send(p.cancel(1))
        res = c.collect([1])[1]
        assert res.done is not None and res.done["finish_reason"] == "cancelled"
    url = f"http://127.0.0.1:{synthetic.http_port}/v1/completions"
    body = json.dumps({"prompt": "hi", "max_tokens": 5}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as r:
        reply = json.load(r)
    assert reply["choices"][0]["text"] == " x" * 5
    assert reply["usage"]["completion_tokens"] == 5
    body = json.dumps({"prompt": "hi", "max_tokens": 40, "stream": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == " x" * 40
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    wait_until(synthetic.idle, 10, "the gateway to be idle")


@pytest.mark.integration
def test_bench_reports_added_latency_and_gateway_cpu(tmp_path):
    svc = Service(model={"engine": "synthetic"}, workers={"count": 1, "slots": 8},
                  synthetic={"step_ms": 0.5, "stamp": True})
    assert svc.start().returncode == 0
    try:
        out = tmp_path / "bench.json"
        r = subprocess.run(
            [sys.executable, "-m", "llmctl.tools.bench", "--target", f"tcp://127.0.0.1:{svc.port}",
             "--clients", "4", "--requests", "8", "--max-tokens", "30", "--stamped", "-q",
             "-c", str(svc.config), "--json", str(out)],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        s = json.loads(out.read_text())["points"][0]["summary"]
        assert s["ok"] == 8 and s["tokens_out"] == 8 * 30
        assert s["added_ms"]["count"] == 8 * 30 and s["added_ms"]["min"] >= 0
        assert s["gateway_cpu_s"] > 0 and s["gateway_cpu_ms_per_1k_tokens"] > 0
    finally:
        svc.stop()
