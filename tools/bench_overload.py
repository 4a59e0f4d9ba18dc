"""``llmctl bench --overload FACTOR``: offered load at a multiple of the measured capacity.

1. Capacity: ``--clients`` closed-loop clients (one per slot saturates a service) for
   ``--capacity-s`` seconds; capacity = successful requests / wall time.
2. Overload: Poisson arrivals at FACTOR x capacity for ``--duration`` seconds (or
   ``--requests`` arrivals), each sent at its time whatever is in flight.

Reported: the outcome counts, how fast ``overloaded`` is answered (GENERATE sent to ERROR
received: p50, p99, max), the ``retry_after_ms`` range, the accepted requests' figures,
and, given the config of the running service (``-c``), its gateway's RSS every second.
"""
from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from typing import Any, Callable

from llmctl.common.client import now
from llmctl.common.stats import percentile
from llmctl.tools.bench_load import Workload, closed_loop, open_loop
from llmctl.tools.bench_stats import OVERLOADED, RequestRecord, describe, summarize, wall_time
from llmctl.tools.bench_targets import Target
from llmctl.tools.service_status import status


async def sample_rss(pid: int, stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    """(seconds since start, MiB) of process ``pid`` every second until ``stop``."""
    import psutil
    proc, t0 = psutil.Process(pid), now()
    while True:
        try:
            out.append((round(now() - t0, 1), round(proc.memory_info().rss / 2**20, 1)))
        except psutil.Error:
            return
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
            return
        except asyncio.TimeoutError:
            pass


def figures(records: list[RequestRecord], capacity: float, factor: float,
            offered_s: float, rss: list[tuple[float, float]]) -> dict[str, Any]:
    """The overload figures of the offered phase's records."""
    over = [r for r in records if r.error == OVERLOADED]
    retry = [r.retry_after_ms for r in over if r.retry_after_ms is not None]
    outcomes = Counter("done" if r.ok else r.error or "unfinished" for r in records)
    return {
        "capacity_rps": capacity, "factor": factor, "offered_rps": capacity * factor,
        "offered_s": offered_s, "sent": len(records),
        "outcomes": dict(outcomes.most_common()),
        "overloaded_ms": describe([r.e2e for r in over if r.e2e is not None], 1000),
        "retry_after_ms": {"min": min(retry, default=None),
                           "p50": percentile(retry, 50) if retry else None,
                           "max": max(retry, default=None)},
        "gateway_rss_mib": rss,
    }


async def run_overload(target: Target, work: Workload, args: argparse.Namespace,
                       start: Callable[[str, int | None, float | None], None],
                       on_done: Callable[[RequestRecord], None]) -> dict[str, Any]:
    """Warm-up, capacity, then the offered load; the bench's points plus ``overload``."""
    clients = args.clients[0]
    if args.warmup:
        start(f"{target.url} warm-up", args.warmup, None)
        await closed_loop(target, work, clients, args.warmup, None, on_done, first_index=10_000)
    start(f"{target.url} capacity, clients={clients}", None, args.capacity_s)
    cap = await closed_loop(target, work, clients, None, args.capacity_s, on_done,
                            first_index=20_000)
    ok = sum(r.ok for r in cap)
    capacity = ok / wall_time(cap) if ok else 0.0
    if capacity <= 0:
        raise ConnectionError(f"no request succeeded in {args.capacity_s:g}s: no capacity "
                              "to overload (errors: "
                              f"{dict(Counter(r.error for r in cap if not r.ok))})")
    rate = capacity * args.overload
    rss: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = None
    if args.config:
        st = await asyncio.to_thread(status, args.config)
        if not st.get("running"):
            raise ConnectionError(f"llmctl is not running with {args.config}")
        sampler = asyncio.create_task(sample_rss(st["gateway"]["pid"], stop, rss))
    start(f"{target.url} rate={rate:.3g}/s ({args.overload:g}x)", args.requests, args.duration)
    try:
        records = await open_loop(target, work, rate, args.requests,
                                  None if args.requests else args.duration, on_done,
                                  seed=args.seed or 0)
    finally:
        stop.set()
        if sampler is not None:
            await sampler
    points = [
        {"target": target.url, "clients": clients, "rate": None, "phase": "capacity",
         "summary": summarize(cap, wall_time(cap))},
        {"target": target.url, "clients": None, "rate": rate, "phase": "overload",
         "summary": summarize(records, wall_time(records))},
    ]
    if args.raw:
        for pt, recs in zip(points, (cap, records)):
            t_first = min((r.t_start for r in recs), default=0.0)
            pt["records"] = [r.to_dict(t_first) for r in recs]
    starts = [r.t_start for r in records]
    offered_s = args.duration if not args.requests else max(starts) - min(starts)
    return {"points": points,
            "overload": figures(records, capacity, args.overload, offered_s, rss)}
