"""Request metrics of the gateway: bounded estimators, windowed and since start.

* ``LogHistogram``: fixed, log-spaced buckets (5 % wide) from 10 µs to 1 h: memory is
  constant whatever the traffic. A percentile is the nearest-rank one of
  ``common.stats``, reported as the upper bound of its bucket: never below the exact
  value, at most one bucket (5 %) above it.
* ``Windowed``: one ``LogHistogram`` per second in a ring of ``window_s`` seconds, plus
  one since start: percentiles "over the last 60 s" and "since start".
* ``Rate``: per-second counts in a ring: events per second over the window.

Values are in milliseconds.  ``GatewayMetrics`` holds what the gateway measures and
renders a snapshot for ``llmctl status`` / ``llmctl top``; ``Counters`` are its counters,
one typed field per thing counted; ``dataplane.prom`` turns both into Prometheus
exposition.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from llmctl.common.messages import Finished
from llmctl.common.stats import rank_index

GROWTH = 1.05
LO_MS = 0.01
HI_MS = 3_600_000.0
_BOUNDS = [LO_MS * GROWTH ** i for i in range(int(math.log(HI_MS / LO_MS, GROWTH)) + 2)]
# Prometheus buckets (seconds) for the exported histograms.
PROM_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  120.0, 300.0)


class LogHistogram:
    __slots__ = ("counts", "count", "sum", "min", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}     # sparse: bucket index -> count
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def observe(self, v: float) -> None:
        v = max(0.0, float(v))
        self.add(bisect.bisect_left(_BOUNDS, v), v)   # bucket i holds (BOUNDS[i-1], BOUNDS[i]]

    def add(self, i: int, v: float) -> None:
        """``v`` in bucket ``i`` (the hot path: the bucket found once for several)."""
        counts = self.counts
        counts[i] = counts.get(i, 0) + 1
        self.count += 1
        self.sum += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v

    def merge(self, other: "LogHistogram") -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) by nearest rank (``common.stats``): the upper bound
        of the bucket that holds the sample of that rank, clamped to the largest value
        seen. Never below the exact percentile, at most one bucket (5 %) above it."""
        if not self.count:
            return None
        rank = rank_index(self.count, q)
        if rank == 0:
            return self.min
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen > rank:
                return self.max if i >= len(_BOUNDS) else min(self.max, _BOUNDS[i])
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        r = lambda x: None if x is None else round(x, 3)  # noqa: E731
        return {"count": self.count, "mean": r(self.mean), "p50": r(self.percentile(50)),
                "p95": r(self.percentile(95)), "p99": r(self.percentile(99))}


class Windowed:
    """Percentiles over the last ``window_s`` seconds and since start."""

    def __init__(self, window_s: int = 60) -> None:
        self.window_s = window_s
        self.total = LogHistogram()
        self.prom = [0] * (len(PROM_BUCKETS_S) + 1)   # cumulative at scrape, per bucket here
        self._slices: deque[tuple[int, LogHistogram]] = deque()

    def observe(self, ms: float, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        if not self._slices or self._slices[-1][0] != sec:
            self._slices.append((sec, LogHistogram()))
            self._trim(sec)
        ms = max(0.0, float(ms))
        i = bisect.bisect_left(_BOUNDS, ms)
        self._slices[-1][1].add(i, ms)
        self.total.add(i, ms)
        self.prom[bisect.bisect_left(PROM_BUCKETS_S, ms / 1000.0)] += 1

    def _trim(self, sec: int) -> None:
        while self._slices and self._slices[0][0] <= sec - self.window_s:
            self._slices.popleft()

    def window(self, now: float | None = None) -> LogHistogram:
        sec = int(now if now is not None else time.monotonic())
        self._trim(sec)
        out = LogHistogram()
        for _, h in self._slices:
            out.merge(h)
        return out

    def summary(self, now: float | None = None) -> dict[str, Any]:
        return {"window": self.window(now).summary(), "total": self.total.summary()}


class Rate:
    """Events per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: int = 60) -> None:
        self.window_s = window_s
        self.total = 0
        self._counts: deque[list[int]] = deque()   # [second, count]

    def add(self, n: int = 1, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        if not self._counts or self._counts[-1][0] != sec:
            self._counts.append([sec, 0])
            while self._counts and self._counts[0][0] <= sec - self.window_s:
                self._counts.popleft()
        self._counts[-1][1] += n
        self.total += n

    def rate(self, now: float | None = None, seconds: int | None = None) -> float:
        now = now if now is not None else time.monotonic()
        span = min(seconds or self.window_s, self.window_s)
        sec = int(now)
        n = sum(c for s, c in self._counts if sec - span < s <= sec)
        return n / span

    def history(self, now: float | None = None, seconds: int = 30) -> list[int]:
        """Counts per second for the last ``seconds`` seconds, oldest first."""
        sec = int(now if now is not None else time.monotonic())
        by_sec = {s: c for s, c in self._counts}
        return [by_sec.get(s, 0) for s in range(sec - seconds + 1, sec + 1)]


class GatewayMetrics:
    def __init__(self, window_s: int = 60) -> None:
        self.window_s = window_s
        self.ttft = Windowed(window_s)
        self.e2e = Windowed(window_s)
        self.itl = Windowed(window_s)
        self.queue_wait = Windowed(window_s)
        self.tokens_out = Rate(window_s)
        self.requests = Rate(window_s)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.tokens_max = 0                   # the longest request (prompt + completion)
        self.worker_tokens: dict[str, Rate] = {}
        self.worker_prefill_ms: dict[str, float] = {}
        self.worker_decode_ms: dict[str, float] = {}

    def on_tokens(self, worker: str, n: int, now: float) -> None:
        """``n`` tokens of one worker message went to clients (their gaps are ``itl``)."""
        self.tokens_out.add(n, now)
        rate = self.worker_tokens.get(worker)
        if rate is None:
            rate = self.worker_tokens[worker] = Rate(self.window_s)
        rate.add(n, now)

    def on_done(self, fin: Finished, now: float) -> None:
        self.requests.add(1, now)
        self.ttft.observe(fin.ttft_ms, now)
        self.e2e.observe(fin.total_ms, now)
        self.prompt_tokens += fin.prompt_tokens
        self.completion_tokens += fin.completion_tokens
        self.cached_tokens += fin.cached_tokens or 0
        self.tokens_max = max(self.tokens_max, fin.prompt_tokens + fin.completion_tokens)
        w = fin.worker
        self.worker_prefill_ms[w] = self.worker_prefill_ms.get(w, 0.0) + (fin.prefill_ms or 0.0)
        self.worker_decode_ms[w] = self.worker_decode_ms.get(w, 0.0) + (fin.decode_ms or 0.0)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = now if now is not None else time.monotonic()
        return {
            "window_s": self.window_s,
            "ttft_ms": self.ttft.summary(now), "latency_ms": self.e2e.summary(now),
            "itl_ms": self.itl.summary(now), "queue_wait_ms": self.queue_wait.summary(now),
            "tokens_per_s": round(self.tokens_out.rate(now), 3),
            "tokens_per_s_10s": round(self.tokens_out.rate(now, 10), 3),
            "requests_per_s": round(self.requests.rate(now), 3),
            "tokens_history": self.tokens_out.history(now, 30),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "workers": {w: {"tokens_per_s": round(r.rate(now, 10), 3), "tokens": r.total,
                            "prefill_ms": round(self.worker_prefill_ms.get(w, 0.0), 1),
                            "decode_ms": round(self.worker_decode_ms.get(w, 0.0), 1)}
                        for w, r in self.worker_tokens.items()},
        }


@dataclass
class Counters:
    admitted: int = 0
    dispatched: int = 0
    done: int = 0
    cancelled: int = 0             # by the client (CANCEL, disconnect)
    cancelled_queued: int = 0
    cancelled_prefill: int = 0     # where the worker was when it stopped
    cancelled_decode: int = 0
    expired_queued: int = 0
    expired_running: int = 0
    requeued: int = 0              # sent to another worker: its own died before output
    worker_failed: int = 0
    slow_clients: int = 0          # streams ended with slow_client (or clients dropped)
    parked: int = 0
    yielded: int = 0               # running requests asked to yield their slot (fairness.py)
    resumed: int = 0
    probes: int = 0
    probes_failed: int = 0
    prompt_tokens: int = 0
    cache_hit_tokens: int = 0
    drafted_tokens: int = 0        # speculation: draft tokens verified, and kept
    accepted_tokens: int = 0
    dropped_messages: int = 0      # malformed internal messages, logged and dropped
    connections: int = 0           # open TCP client connections (a gauge)
    errors: Counter[str] = field(default_factory=Counter)   # answered to clients, by code

    def snapshot(self) -> dict[str, int]:
        """Every counter but the errors and the connections gauge, as status shows them."""
        out = dataclasses.asdict(self)
        del out["errors"], out["connections"]
        return out
