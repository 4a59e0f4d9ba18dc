"""The one percentile definition: nearest rank, everywhere it is reported."""
from __future__ import annotations

import math

import pytest

from llmctl.common.stats import percentile, rank_index
from llmctl.dataplane.metrics import GROWTH, LogHistogram
from llmctl.tools.bench_stats import RequestRecord, describe, summarize, wall_time

# `llmctl status` once said TTFT p99 37 ms for these: seven requests of about 37 ms, one of 112.
TTFT_MS = [36.4, 37.1, 36.9, 37.6, 38.2, 36.8, 112.0, 37.3]


def test_nearest_rank_definition():
    assert [rank_index(8, p) for p in (0, 12.5, 13, 50, 87.5, 88, 99, 100)] == \
        [0, 0, 1, 3, 6, 7, 7, 7]
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0           # always one of the samples
    assert percentile([2.0, 4.0], 50) == 2.0                 # at least half are <= 2
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_p99_of_eight_samples_is_the_slowest_in_the_bench_statistics():
    assert percentile(TTFT_MS, 99) == 112.0
    assert describe(TTFT_MS)["p99"] == 112.0 and describe(TTFT_MS)["p50"] == 37.1
    # The same through the records of a point: TTFT from send to the first piece.
    recs = [RequestRecord(i, t_start=float(i), t_end=i + 0.5, piece_times=[i + ms / 1000])
            for i, ms in enumerate(TTFT_MS)]
    s = summarize(recs, wall_time(recs))
    assert s["ttft_ms"]["p99"] == pytest.approx(112.0)
    assert s["ttft_ms"]["p95"] == pytest.approx(112.0)


def test_p99_of_eight_samples_is_the_slowest_in_the_gateway_histogram():
    h = LogHistogram()
    for ms in TTFT_MS:
        h.observe(ms)
    summary = h.summary()
    assert 112.0 <= summary["p99"] <= 112.0 * GROWTH        # within its bucket, never below
    assert summary["p99"] == pytest.approx(112.0)            # clamped to the largest seen
    assert 37.1 <= summary["p50"] <= 37.1 * GROWTH
    assert h.percentile(0) == min(TTFT_MS)


def test_histogram_never_reports_below_the_exact_percentile():
    values = [0.5 * 1.013 ** i for i in range(700)]          # many per bucket
    h = LogHistogram()
    for v in values:
        h.observe(v)
    for q in (1, 10, 50, 90, 95, 99, 99.9, 100):
        exact = percentile(values, q)
        assert exact <= h.percentile(q) <= exact * GROWTH * (1 + 1e-12), q
