"""The load generator: its statistics, its prompt loader, and short real runs."""
from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.service import ROOT
from llmctl.common.client import now
from llmctl.common.prompts import load_prompts
from llmctl.tools.bench import collector_paused
from llmctl.tools.bench_load import Workload, closed_loop
from llmctl.tools.bench_stats import RequestRecord, compare, percentile, summarize, wall_time


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy_on_known_data(q):
    data = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0]
    assert percentile(data, q) == np.percentile(data, q, method="inverted_cdf")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
       st.floats(0, 100))
def test_percentile_matches_numpy_bit_for_bit(values, q):
    assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")


def test_summary_arithmetic_on_synthetic_records():
    # Two requests of 4 pieces 0.1 s apart, first piece 0.5 s after the send; one overloaded.
    a = RequestRecord(0, t_start=10.0, t_end=10.8, piece_times=[10.5, 10.6, 10.7, 10.8],
                      completion_tokens=4)
    b = RequestRecord(1, t_start=10.2, t_end=11.0, piece_times=[10.7, 10.8, 10.9, 11.0])
    c = RequestRecord(2, t_start=10.3, t_end=10.301, error="overloaded", retry_after_ms=50)
    recs = [a, b, c]
    assert wall_time(recs) == pytest.approx(1.0)
    s = summarize(recs, wall_time(recs))
    assert (s["requests"], s["ok"], s["overloaded"], s["failed"]) == (3, 2, 1, 0)
    assert s["tokens_out"] == 8 and s["tokens_per_s"] == pytest.approx(8.0)
    assert s["requests_per_s"] == pytest.approx(2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(500.0)
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_pooled_ms"]["count"] == 6
    assert s["e2e_ms"]["max"] == pytest.approx(800.0)
    r = compare(s, {**s, "tokens_per_s": 4.0})
    assert r["tokens_per_s"] == pytest.approx(2.0) and r["e2e_p99"] == pytest.approx(1.0)


def test_stamps_become_the_added_latency_of_each_token():
    # Pieces stamped by a synthetic worker (monotonic ns, one or two in a piece), each
    # arriving at its piece time; unstamped text is not a stamp.
    rec = RequestRecord(0, t_start=0.0, t_end=3.0, piece_times=[1.0, 2.0, 3.0],
                        stamped=["999000000 ", "1999500000 1999000000 ", "hello "])
    assert rec.lags == pytest.approx([0.001, 0.0005, 0.001])
    s = summarize([rec], wall_time([rec]))
    assert s["added_ms"]["count"] == 3 and s["added_ms"]["max"] == pytest.approx(1.0)
    assert rec.to_dict()["lags"] == rec.lags and "stamped" not in rec.to_dict()


def test_the_collector_is_off_only_while_a_point_runs():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0


class _Slow:
    """A target that answers after ``s`` seconds and notes when each request was sent."""

    def __init__(self, s: float) -> None:
        self.s = s
        self.sent: list[float] = []

    async def request(self, index: int, spec: dict) -> RequestRecord:
        self.sent.append(now())
        await asyncio.sleep(self.s)
        return RequestRecord(index, t_start=self.sent[-1], t_end=now())


def test_ramp_spreads_the_clients_first_requests():
    work = Workload([{"prompt": "x"}], 4, 0.0, None, False)
    t = _Slow(0.3)                  # longer than the ramp: each client sends one request
    recs = asyncio.run(closed_loop(t, work, 4, 4, None, lambda r: None, ramp_s=0.2))
    # Client k sent its first request no sooner than k/4 of 0.2 s after the first one.
    assert len(recs) == 4 == len(t.sent)
    assert all(t.sent[k] - t.sent[0] >= 0.05 * k - 1e-3 for k in range(4))


def test_prompt_loader(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('# comment\n{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert load_prompts(f) == [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}]
    f.write_text('{"prompt": "a", "messages": []}\n')
    with pytest.raises(ValueError, match="exactly one"):
        load_prompts(f)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match=":1: not JSON"):
        load_prompts(f)


@pytest.mark.integration
def test_short_real_runs_against_both_fronts(make_service, tmp_path):
    s = make_service(workers={"slots": 2}, http={"enabled": True})
    assert s.start().returncode == 0
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    r = subprocess.run(
        [sys.executable, "-m", "llmctl.control", "bench", "--target", f"tcp://127.0.0.1:{s.port}",
         "--compare", f"http://127.0.0.1:{s.http_port}/v1", "--clients", "1,2",
         "--requests", "3", "--warmup", "1", "--max-tokens", "8", "--quiet",
         "--json", str(out), "--plot", str(plot)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert {"config", "machine", "points"} <= set(res)
    assert len(res["points"]) == 4                       # 2 targets x 2 concurrencies
    for p in res["points"]:
        sm = p["summary"]
        assert sm["ok"] == 3 and sm["errors"] == {}
        assert 0 < sm["tokens_out"] <= 3 * 8
        assert sm["tokens_per_s"] == pytest.approx(sm["tokens_out"] / sm["wall_s"])
        for k in ("ttft_ms", "e2e_ms"):
            assert 0 <= sm[k]["p50"] <= sm[k]["p99"]
    assert plot.stat().st_size > 1000 and "ratios" in r.stdout


class FakeEngine:
    """The BatchEngine calls worker/loadgen.py makes: each request is one piece, then DONE."""

    def __init__(self, slots: int) -> None:
        self.slots, self.running, self.most = slots, {}, 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def prepare(self, rid, fields):
        from llmctl.common.errors import BadRequest
        if fields.prompt == "bad":
            raise BadRequest("no")
        return type("Seq", (), {"rid": rid, "fields": fields})()

    def start(self, seq) -> None:
        self.running[seq.rid] = seq
        self.most = max(self.most, len(self.running))

    def step(self):
        from llmctl.worker.engine import Event
        rid = next(iter(self.running))
        del self.running[rid]
        from llmctl.common.messages import DoneStats
        return [Event(rid, "x"), Event(rid, done=DoneStats("length", prompt_tokens=2,
                                                           completion_tokens=1))]


def test_engine_entry_point_runs_a_closed_loop():
    from llmctl.worker.loadgen import run
    engine, out = FakeEngine(slots=8), []
    reqs = [(i, {"prompt": "bad" if i == 3 else f"p{i}", "max_tokens": 4}) for i in range(7)]
    run(engine, reqs, 2, out.append)
    assert sorted(r["index"] for r in out) == list(range(7))        # each request once
    assert engine.most <= 2                                          # never more than the clients
    bad = next(r for r in out if r["index"] == 3)
    assert bad["error"] == "bad_request" and bad["t_end"] >= bad["t_start"]
    recs = [RequestRecord.from_dict(r) for r in out if r["index"] != 3]
    assert all(r.ok and r.tokens == 1 and r.pieces == 1 for r in recs)


@pytest.mark.integration
def test_engine_and_overload_modes(make_service, tmp_path):
    from tests.service import MODEL
    out = tmp_path / "engine.json"
    r = subprocess.run(
        [sys.executable, "-m", "llmctl.control", "bench", "--engine", str(MODEL), "--clients", "2",
         "--requests", "3", "--warmup", "1", "--max-tokens", "4", "--threads", "1", "--quiet",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    [p] = res["points"]
    assert res["config"]["mode"] == "engine" and p["summary"]["ok"] == 3
    assert res["servers"][p["target"]]["slots"] == 2 and 0 < p["summary"]["tokens_out"] <= 12

    s = make_service(gateway={"max_queue": 1})
    assert s.start().returncode == 0
    out = tmp_path / "overload.json"
    r = subprocess.run(
        [sys.executable, "-m", "llmctl.control", "bench", "--target", f"tcp://127.0.0.1:{s.port}",
         "--overload", "4", "--capacity-s", "2", "--duration", "3", "--warmup", "0",
         "--max-tokens", "8", "-c", str(s.config), "--quiet", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    o = res["overload"]
    assert res["config"]["mode"] == "overload" and [p["phase"] for p in res["points"]] == \
        ["capacity", "overload"]
    assert o["capacity_rps"] > 0 and o["offered_rps"] == pytest.approx(4 * o["capacity_rps"])
    assert sum(o["outcomes"].values()) == o["sent"] == res["points"][1]["summary"]["requests"]
    assert o["overloaded_ms"]["count"] == o["outcomes"].get("overloaded", 0)
    assert o["gateway_rss_mib"] and "time to answer overloaded" in r.stdout


@pytest.mark.integration
def test_neighbours_mode_smoke(make_service, tmp_path):
    """``--neighbours``: the benchmark starts and kills its CPU-bound neighbours, measures
    the sequential and throughput phases and reads the server's threads (no timing)."""
    import psutil

    s = make_service(workers={"slots": 2}, http={"enabled": True})
    assert s.start().returncode == 0
    out = tmp_path / "neighbours.json"
    r = subprocess.run(
        [sys.executable, "-m", "llmctl.control", "bench", "--target",
         f"http://127.0.0.1:{s.http_port}/v1", "--compare", f"tcp://127.0.0.1:{s.port}",
         "--neighbours", "0,1", "--requests", "2",
         "--clients", "2", "--duration", "1", "--max-tokens", "4", "--quiet",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    nb = json.loads(out.read_text())["neighbours"]
    assert [p["neighbours"] for p in nb["points"]] == [0, 1]
    [hog] = nb["points"][1]["neighbour_pids"]
    assert not psutil.pid_exists(hog) or psutil.Process(hog).status() == "zombie"
    for p in nb["points"]:
        assert [t["target"][:4] for t in p["targets"]] == ["http", "tcp:"]
        for t in p["targets"]:
            assert t["sequential"]["ok"] == 2 and t["throughput"]["clients"] == 2
            assert t["throughput"]["ok"] >= 1 and t["sequential"]["tokens"] > 0
            names = {row["process"] for row in t["threads"]}
            assert "llmctl.worker" in names, t["threads"]
    assert "threads of http://" in r.stdout and "median s" in r.stdout and "a/b:" in r.stdout
