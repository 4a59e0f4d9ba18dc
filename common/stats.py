"""The one percentile definition of the project: nearest rank, conservative.

The p-th percentile of n samples is the smallest sample below or at which at least p % of
the samples lie: ``sorted(values)[ceil(p / 100 * n) - 1]`` (the first one for p = 0). It
is always one of the samples, never an interpolation between two, and it never
under-reports a tail: the p99 of 8 samples is their maximum (one slow request in eight
is the 99th percentile, not something between it and the others). It is
``numpy.percentile(values, p, method="inverted_cdf")``, computed the same way.

The load generator's statistics (tools/bench_stats.py), the gateway's histograms
(dataplane/metrics.py, which report the upper bound of the bucket holding that rank) and
every tool that reports a percentile use it.
"""
from __future__ import annotations

import math
from typing import Iterable


def rank_index(n: int, p: float) -> int:
    """The 0-based index, in ``n`` sorted samples, of the p-th percentile (0 <= p <= 100)."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if n <= 0:
        raise ValueError("no samples")
    # n * (p / 100), in that order: numpy's arithmetic, so that both agree to the bit.
    return min(n - 1, max(0, math.ceil(n * (p / 100)) - 1))


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0 <= p <= 100) of ``values`` by nearest rank; NaN for none."""
    xs = sorted(float(v) for v in values)
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not xs:
        return math.nan
    return xs[rank_index(len(xs), p)]
