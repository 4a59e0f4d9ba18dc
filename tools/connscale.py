"""Connection-scale benchmark of a running llmctl's TCP front (a benchmark, not a test).

    python -m llmctl.tools.connscale -c config.toml --idle 1000 --slowloris 300 --slow-readers 50

Three hostile or merely numerous populations, one after the other, each measured against
a well-behaved client's requests (``--probes`` greedy requests, TTFT and end-to-end):

* ``--idle N``: connections that complete the handshake and then say nothing. Reports
  the gateway's RSS growth per connection and the probe latency beside them.
* ``--slowloris N``: connections that send their HELLO one byte a second. Reports how many
  the server closed and after how long (the handshake timeout).
* ``--slow-readers N``: connections that send one long GENERATE and never read (small
  receive buffer). Reports when they were parked and cancelled (``slow_client``), the
  probe latency beside them, and that the probes never timed out.

Well-behaved connections (the probes, the idle ones) are ``common.client`` connections; the
slowloris and non-reading ones are raw sockets, on purpose. Percentiles are nearest-rank
(``common.stats.percentile``). Prints the figures; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from llmctl.common import protocol as p
from llmctl.common.client import Connection
from llmctl.common.stats import percentile
from llmctl.tools.bench_targets import TcpTarget
from llmctl.tools.service_status import gateway_address, status

PROMPT = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.0}


async def probe(url: str, n: int) -> dict[str, Any]:
    """``n`` requests one after the other: TTFT and E2E in ms, and their errors."""
    tgt = TcpTarget(url, timeout=120.0)
    await tgt.open()
    recs = [await tgt.request(i, dict(PROMPT)) for i in range(n)]
    await tgt.close()
    ok = [r for r in recs if r.ok]
    ttft = [r.ttft * 1000 for r in ok if r.ttft is not None]
    e2e = [(r.t_end - r.t_start) * 1000 for r in ok]
    return {"n": n, "ok": len(ok), "errors": [r.error for r in recs if not r.ok],
            "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
            "ttft_p99_ms": round(percentile(ttft, 99), 1) if ttft else None,
            "e2e_p50_ms": round(percentile(e2e, 50), 1) if e2e else None,
            "e2e_p99_ms": round(percentile(e2e, 99), 1) if e2e else None}


async def idle(host: str, port: int, url: str, n: int, probes: int, gw: psutil.Process) -> dict:
    base = await probe(url, probes)
    rss0 = gw.memory_info().rss
    conns = [await Connection.open(host, port, client="idle/1.0") for _ in range(n)]
    rss1 = gw.memory_info().rss           # every WELCOME back: all handshakes done
    beside = await probe(url, probes)
    await asyncio.gather(*(c.close() for c in conns))
    return {"connections": n, "rss_growth_mib": round((rss1 - rss0) / 2**20, 1),
            "rss_per_connection_kib": round((rss1 - rss0) / n / 1024, 1),
            "probe_alone": base, "probe_beside": beside}


async def slowloris(host: str, port: int, n: int, timeout: float) -> dict:
    hello = p.hello("slowloris/1.0")
    t0 = time.monotonic()
    closed_at: list[float] = []

    async def one() -> None:
        r, w = await asyncio.open_connection(host, port)
        try:
            for b in hello[:-1]:        # never the whole HELLO
                w.write(bytes([b]))
                try:
                    if not await asyncio.wait_for(r.read(1), 1.0):
                        break
                except asyncio.TimeoutError:
                    continue
                break
        except ConnectionError:
            pass
        closed_at.append(time.monotonic() - t0)
        w.close()

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout)
    return {"connections": n, "closed_by_server": len(closed_at),
            "closed_after_s_p50": round(percentile(closed_at, 50), 2),
            "closed_after_s_max": round(max(closed_at), 2)}


async def slow_readers(config: str, host: str, port: int, url: str, n: int,
                       probes: int) -> dict:
    def counters() -> dict[str, Any]:
        gw = status(config)["gateway"]
        return {**gw["counters"], "errors": gw["errors"]}

    start = await asyncio.to_thread(counters)
    socks = []
    t0 = time.monotonic()
    for i in range(n):
        so = socket.socket()
        so.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        so.connect((host, port))
        so.sendall(p.hello("slow-reader/1.0") + p.generate(
            1, prompt=", ".join(f"{i}{k}" for k in range(1, 6)) + ",", max_tokens=1500,
            temperature=0.0, deadline_ms=600_000))
        socks.append(so)
    # Each one is served until its receive buffer and token window are full, then parked.
    while (await asyncio.to_thread(counters))["parked"] - start["parked"] < n \
            and time.monotonic() - t0 < 600:
        await asyncio.sleep(0.5)
    t_parked = time.monotonic() - t0
    beside = await probe(url, probes)
    while (await asyncio.to_thread(counters))["slow_clients"] - start["slow_clients"] < n \
            and time.monotonic() - t0 < 900:
        await asyncio.sleep(0.5)
    t_slow = time.monotonic() - t0
    end = await asyncio.to_thread(counters)
    for so in socks:
        so.close()
    return {"connections": n, "all_parked_after_s": round(t_parked, 1),
            "probe_beside_parked": beside,
            "all_slow_client_after_s": round(t_slow, 1),
            "parked": end["parked"] - start["parked"],
            "slow_clients": end["slow_clients"] - start["slow_clients"],
            "timeouts": end["errors"].get("timeout", 0) - start["errors"].get("timeout", 0)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    st = status(args.config)
    if not st.get("running"):
        raise SystemExit(f"llmctl is not running with {args.config}")
    host, port = gateway_address(st)
    url = f"tcp://{host}:{port}"
    gw = psutil.Process(st["gateway"]["pid"])
    out: dict[str, Any] = {"gateway_pid": gw.pid}
    if args.idle:
        out["idle"] = await idle(host, port, url, args.idle, args.probes, gw)
    if args.slowloris:
        out["slowloris"] = await slowloris(host, port, args.slowloris, 120.0)
    if args.slow_readers:
        out["slow_readers"] = await slow_readers(args.config, host, port, url,
                                                 args.slow_readers, args.probes)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.connscale", description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default="config.toml")
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--slowloris", type=int, default=300)
    ap.add_argument("--slow-readers", type=int, default=50)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = asyncio.run(run(args))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
