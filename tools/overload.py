"""Overload benchmark: offered load at a multiple of capacity (not a pass/fail test).

    python -m llmctl.tools.overload [--factor 4] [--duration 30] [--max-tokens 32] [--json PATH]

Starts llmctl on free ports (1 worker x 1 slot, max_queue 2 unless told otherwise),
measures its capacity (requests/s, closed loop, one client per slot), then offers
``factor`` x that rate as Poisson arrivals for ``duration`` seconds over a pool of
connections.  Reports how fast ``overloaded`` is answered (p50/p99 from GENERATE sent
to ERROR received), the outcome counts, and the gateway's RSS sampled every second.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

import psutil

from llmctl.common import protocol as p
from llmctl.common.protocol import FrameDecoder, FrameType


class Conn:
    """One asyncio connection with many streams; futures resolved on DONE/ERROR."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.dec = FrameDecoder(1 << 24, allowed=p.SERVER_TYPES)
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_stream = 1

    @classmethod
    async def open(cls, port: int) -> "Conn":
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = cls(r, w)
        w.write(p.hello("overload/1.0"))
        while True:
            frames = c.dec.feed(await r.read(65536))
            if frames:
                assert frames[0].type is FrameType.WELCOME
                break
        c.task = asyncio.create_task(c._read())
        return c

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            for f in self.dec.feed(data):
                if f.type in (FrameType.DONE, FrameType.ERROR):
                    fut = self.waiting.pop(f.stream, None)
                    if fut and not fut.done():
                        fut.set_result((f.type, json.loads(f.payload), time.monotonic()))

    async def request(self, **fields: Any) -> tuple[FrameType, dict, float]:
        stream = self.next_stream
        self.next_stream = self.next_stream % 1_000_000 + 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[stream] = fut
        t0 = time.monotonic()
        self.writer.write(p.generate(stream, **fields))
        kind, body, t1 = await fut
        return kind, body, (t1 - t0) * 1000


async def run(port: int, gw_pid: int, slots: int, factor: float, duration: float,
              max_tokens: int) -> dict[str, Any]:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0}
    conns = [await Conn.open(port) for _ in range(8)]
    # Capacity: closed loop, one client per slot, 5 s.
    done = 0
    end = time.monotonic() + 5.0

    async def closed(c: Conn) -> None:
        nonlocal done
        while time.monotonic() < end:
            kind, _, _ = await c.request(**body)
            done += kind is FrameType.DONE
    t0 = time.monotonic()
    await asyncio.gather(*(closed(conns[i]) for i in range(slots)))
    capacity = done / (time.monotonic() - t0)
    rate = capacity * factor

    results: list[tuple[FrameType, dict, float]] = []
    rss: list[tuple[float, int]] = []
    gw = psutil.Process(gw_pid)
    stop = time.monotonic() + duration
    start = time.monotonic()

    async def sample() -> None:
        while time.monotonic() < stop:
            rss.append((round(time.monotonic() - start, 1), gw.memory_info().rss))
            await asyncio.sleep(1.0)

    async def one(c: Conn) -> None:
        results.append(await c.request(**body))

    sampler = asyncio.create_task(sample())
    tasks = []
    i = 0
    while time.monotonic() < stop:
        await asyncio.sleep(random.expovariate(rate))
        tasks.append(asyncio.create_task(one(conns[i % len(conns)])))
        i += 1
    await asyncio.gather(*tasks)
    await sampler
    for c in conns:
        c.writer.close()
    over = sorted(ms for k, b, ms in results if b.get("code") == "overloaded")
    ok = [ms for k, b, ms in results if k is FrameType.DONE]
    codes: dict[str, int] = {}
    for k, b, _ in results:
        key = "done" if k is FrameType.DONE else b.get("code", "?")
        codes[key] = codes.get(key, 0) + 1

    def pct(xs: list[float], q: float) -> float | None:
        if not xs:
            return None
        return round(xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 3)
    retry = [b.get("retry_after_ms") for _, b, _ in results if b.get("code") == "overloaded"]
    return {
        "capacity_rps": round(capacity, 3), "offered_rps": round(rate, 3),
        "sent": len(results), "outcomes": codes,
        "overloaded_ms": {"p50": pct(over, 50), "p99": pct(over, 99),
                          "max": round(max(over), 3) if over else None},
        "ok_latency_ms": {"p50": pct(sorted(ok), 50), "p99": pct(sorted(ok), 99)},
        "retry_after_ms": {"min": min(retry, default=None), "max": max(retry, default=None),
                           "median": statistics.median(retry) if retry else None},
        "gateway_rss_mib": [(t, round(b / 2**20, 1)) for t, b in rss],
    }


def main(argv: list[str] | None = None) -> int:
    from tests.service import Service

    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.overload")
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    svc = Service(gateway={"max_queue": args.max_queue, "max_streams": 10_000},
                  model={"threads": 2})
    r = svc.start()
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return 1
    try:
        st = svc.status()
        res = asyncio.run(run(svc.port, st["gateway"]["pid"], 1, args.factor, args.duration,
                              args.max_tokens))
    finally:
        svc.stop()
    rss = [m for _, m in res["gateway_rss_mib"]]
    print(f"capacity {res['capacity_rps']} req/s; offered {res['offered_rps']} req/s "
          f"for {args.duration:.0f} s; sent {res['sent']}: {res['outcomes']}")
    print(f"time to answer overloaded: p50 {res['overloaded_ms']['p50']} ms, "
          f"p99 {res['overloaded_ms']['p99']} ms, max {res['overloaded_ms']['max']} ms")
    print(f"retry_after_ms: {res['retry_after_ms']}")
    print(f"accepted requests' latency: {res['ok_latency_ms']} ms")
    print(f"gateway RSS: start {rss[0]} MiB, max {max(rss)} MiB, end {rss[-1]} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
