"""Observability: bounded percentile estimators, /metrics, status and the dashboard."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from tests.service import wait_until

from llmctl.control.render import dashboard, sparkline
from llmctl.dataplane.metrics import GROWTH, LogHistogram, Rate, Windowed

KNOWN = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 250.0, 1000.0]


def close(est: float, exact: float) -> bool:
    """Never below, at most one bucket above: the estimator's stated accuracy."""
    return exact - 1e-9 <= est <= exact * GROWTH + 1e-9


@pytest.mark.parametrize("q", [0, 50, 90, 95, 99, 100])
def test_percentiles_match_numpy_on_known_data(q):
    h = LogHistogram()
    for v in KNOWN:
        h.observe(v)
    exact = float(np.percentile(KNOWN, q, method="inverted_cdf"))
    assert close(h.percentile(q), exact), (q, h.percentile(q), exact)
    assert h.mean == pytest.approx(np.mean(KNOWN))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.05, 600_000, allow_nan=False), min_size=1, max_size=400),
       st.sampled_from([50, 95, 99]))
def test_percentiles_within_half_a_bucket(values, q):
    h = LogHistogram()
    for v in values:
        h.observe(v)
    # The estimate lies in the bucket of the sample whose rank is q (numpy "lower"/"higher").
    lo = float(np.percentile(values, q, method="lower"))
    hi = float(np.percentile(values, q, method="higher"))
    est = h.percentile(q)
    assert lo / GROWTH - 1e-9 <= est <= hi * GROWTH + 1e-9


def test_memory_is_bounded():
    h = LogHistogram()
    for i in range(200_000):
        h.observe((i % 5000) * 0.37)
    assert len(h.counts) < 400 and h.count == 200_000


def test_window_forgets_old_seconds_but_total_keeps_them():
    w = Windowed(window_s=60)
    w.observe(1000.0, now=0.0)
    w.observe(10.0, now=100.0)
    assert w.window(now=100.0).count == 1 and w.window(now=100.0).percentile(50) == pytest.approx(10, rel=0.03)
    assert w.total.count == 2


def test_rate_over_window_and_history():
    r = Rate(window_s=10)
    for t in range(10):
        r.add(5, now=float(t))
    assert r.rate(now=9.5) == 5.0
    assert r.rate(now=9.5, seconds=2) == 5.0
    assert r.history(now=9.0, seconds=3) == [5, 5, 5]
    assert r.rate(now=30.0) == 0.0 and r.total == 50


def test_sparkline():
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([0, 4, 8])[-1] == "█"


@pytest.mark.integration
def test_metrics_status_and_dashboard_after_real_traffic(make_service):
    s = make_service(workers={"count": 2})
    assert s.start().returncode == 0
    with s.client() as c:
        for i in range(1, 6):
            assert c.complete(i, prompt=f"Fact {i}:", max_tokens=5, temperature=0.0).done
        bad = c.complete(9, prompt="x", max_tokens=0)
        assert bad.error["code"] == "bad_request"

    def scrape() -> dict:
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=10).read()
        return {f.name: f for f in text_string_to_metric_families(text.decode())}

    # Process figures arrive from the supervisor every 0.5 s.
    wait_until(lambda: len(scrape()["llmctl_worker_state"].samples) > 0, 10, "process figures")
    fams = scrape()
    done = {smp.labels["outcome"]: smp.value for smp in fams["llmctl_requests"].samples
            if smp.name == "llmctl_requests_total"}
    assert done["admitted"] == 5 and done["done"] == 5
    ttft_count = [smp.value for smp in fams["llmctl_ttft_seconds"].samples
                  if smp.name == "llmctl_ttft_seconds_count"]
    assert ttft_count == [5]
    assert [smp.value for smp in fams["llmctl_completion_tokens"].samples] == [25]
    # llmctl's own families, and llama-server's from the same figures
    assert all(name.startswith(("llmctl_", "llamacpp:")) for name in fams)
    assert [smp.value for smp in fams["llamacpp:tokens_predicted"].samples] == [25]
    states = {(smp.labels["worker"], smp.labels["state"]): smp.value
              for smp in fams["llmctl_worker_state"].samples}
    assert states[("w0", "ready")] == states[("w1", "ready")] == 1.0
    assert sum(states.values()) == 2
    rss = {smp.labels["process"] for smp in fams["llmctl_process_rss_bytes"].samples}
    assert {"supervisor", "gateway", "w0", "w1"} <= rss

    st_ = json.loads(s.llmctl("status", "--json").stdout)
    assert st_["metrics"]["latency_ms"]["total"]["count"] == 5
    assert st_["metrics"]["ttft_ms"]["window"]["p99"] is not None
    assert st_["gateway"]["errors"] == {"bad_request": 1}

    console = Console(record=True, width=80, height=24)
    console.print(dashboard(st_))
    out = console.export_text()
    for w in st_["workers"]:
        assert w["id"] in out and str(w["pid"]) in out
    assert "TTFT p50/95/99" in out and "bad_request 1" in out and "CPU" in out
    assert len(out.rstrip("\n").splitlines()) <= 24
    assert max(len(line) for line in out.splitlines()) <= 80
