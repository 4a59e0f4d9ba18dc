"""Statistics of the load generator (tools/bench.py): per-request records and per-point summaries.

Pure functions, no I/O, no numpy: everything here is unit-tested against known inputs.

Definitions (all times from ``time.perf_counter()``, reported in milliseconds):

- TTFT: from sending the request to the first piece of output (a TOKEN frame / SSE chunk with text).
- ITL (inter-token latency): the gaps between consecutive pieces of output of one request.
  ``itl`` summarises the per-request mean gap, ``itl_pooled`` every gap of every request.
  A server that sends several tokens in one piece shows one gap for them.
- E2E: from sending the request to its end (DONE / ``data: [DONE]``).
- tokens out: the server's ``completion_tokens`` when it reports one, else the pieces counted.
- tokens/s and requests/s: over the measured wall time of the point (first send to last end),
  counting successful requests only.
- percentiles: nearest rank (``common.stats.percentile``): the p99 of 8 requests is the slowest.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

from llmctl.common.stats import percentile

OVERLOADED = "overloaded"
PERCENTILES = (50, 95, 99)


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def describe(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, min, p50, p95, p99, max of ``values`` times ``scale`` (None when empty)."""
    vs = [v * scale for v in values]
    out: dict[str, float | int | None] = {"count": len(vs)}
    if not vs:
        out.update({"mean": None, "min": None, **{f"p{p}": None for p in PERCENTILES}, "max": None})
        return out
    out["mean"] = mean(vs)
    out["min"] = min(vs)
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(vs, p)
    out["max"] = max(vs)
    return out


@dataclass
class RequestRecord:
    """What one request did; times are absolute ``perf_counter()`` seconds."""

    index: int
    t_start: float
    t_end: float | None = None
    piece_times: list[float] = field(default_factory=list)   # arrival of each output piece
    completion_tokens: int | None = None                     # as the server reported it
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None                                  # error code; None when ok
    message: str | None = None
    retry_after_ms: int | None = None
    # --stamped: each piece's text, as the synthetic workers stamped it; parsed into
    # ``lags`` after the point, not while the load generator is timing arrivals
    stamped: list[str] | None = None

    @property
    def lags(self) -> list[float]:
        """For each stamp a synthetic worker put in the output (``[synthetic] stamp``: the
        monotonic nanoseconds the token was made at), its piece's arrival minus it
        (seconds): what the data plane added. perf_counter and monotonic are one clock
        on Linux."""
        return [t - int(word) / 1e9
                for piece, t in zip(self.stamped or (), self.piece_times)
                for word in piece.split() if word.isdigit()]

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_end is not None

    @property
    def pieces(self) -> int:
        return len(self.piece_times)

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.pieces

    @property
    def ttft(self) -> float | None:
        return self.piece_times[0] - self.t_start if self.piece_times else None

    @property
    def e2e(self) -> float | None:
        return self.t_end - self.t_start if self.t_end is not None else None

    @property
    def gaps(self) -> list[float]:
        ts = self.piece_times
        return [b - a for a, b in zip(ts, ts[1:])]

    @property
    def itl(self) -> float | None:
        """The mean gap between pieces (None with fewer than two pieces)."""
        ts = self.piece_times
        return (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) >= 2 else None

    def to_dict(self, t0: float = 0.0) -> dict[str, Any]:
        d = asdict(self)
        del d["stamped"]
        d["lags"] = self.lags
        d["t_start"] = self.t_start - t0
        d["t_end"] = None if self.t_end is None else self.t_end - t0
        d["piece_times"] = [t - t0 for t in self.piece_times]
        d.update(ok=self.ok, tokens=self.tokens, ttft=self.ttft, e2e=self.e2e, itl=self.itl)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        """A record from its fields (as ``asdict`` writes them; other keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """The figures of one point: its measured requests and the wall time they took."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "unfinished" for r in records if not r.ok)
    tokens = sum(r.tokens for r in ok)
    rate = (lambda n: n / wall_s) if wall_s > 0 else (lambda n: 0.0)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "overloaded": errors.get(OVERLOADED, 0),
        "failed": sum(n for code, n in errors.items() if code != OVERLOADED),
        "wall_s": wall_s,
        "tokens_out": tokens,
        "tokens_per_s": rate(tokens),
        "requests_per_s": rate(len(ok)),
        "tokens_per_request": mean([r.tokens for r in ok]) if ok else None,
        "ttft_ms": describe([r.ttft for r in ok if r.ttft is not None], 1000),
        "itl_ms": describe([r.itl for r in ok if r.itl is not None], 1000),
        "itl_pooled_ms": describe([g for r in ok for g in r.gaps], 1000),
        "e2e_ms": describe([r.e2e for r in ok if r.e2e is not None], 1000),
        "added_ms": describe([g for r in ok for g in r.lags], 1000),
    }


def wall_time(records: Sequence[RequestRecord]) -> float:
    """First send to last end of ``records`` (0 when none ended)."""
    ends = [r.t_end for r in records if r.t_end is not None]
    if not records or not ends:
        return 0.0
    return max(ends) - min(r.t_start for r in records)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """Ratios a/b of two summaries of the same workload."""
    return {
        "tokens_per_s": ratio(a["tokens_per_s"], b["tokens_per_s"]),
        "requests_per_s": ratio(a["requests_per_s"], b["requests_per_s"]),
        "ttft_p50": ratio(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
        "e2e_p50": ratio(a["e2e_ms"]["p50"], b["e2e_ms"]["p50"]),
        "e2e_p99": ratio(a["e2e_ms"]["p99"], b["e2e_ms"]["p99"]),
    }
