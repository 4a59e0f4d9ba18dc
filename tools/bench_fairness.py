"""Predictable latency under a mix: ``llmctl bench --scenario short-behind-long | tenants``
(docs/benchmarks.md, "Predictable latency").

* ``short-behind-long``: ``--long`` closed-loop clients each ask for ``--long-tokens``
  (a counting prompt, greedy: it does not stop early), and once they have run
  ``--settle`` seconds a client asks ``--trials`` times, one after another, for 8 tokens:
  the short request's time to first token and to its end (p50, p99) and the long
  clients' tokens/s.
* ``non-readers``: ``--non-readers`` connections of the binary protocol (``tcp://``
  target) each ask for ``--long-tokens`` and never read (a 4 KB receive buffer), while
  ``--readers`` clients read normally, ``--trials`` requests each of ``--max-tokens``:
  the readers' TTFT p50/p99/max and how many of their requests ended, how.
* ``tenants``: a quiet tenant (``--quiet-key``) with one sequential client, measured alone
  for ``--duration`` seconds, then again beside a noisy tenant (``--noisy-key``) with
  ``--noisy-clients`` closed-loop clients: the quiet client's TTFT p50/p99 in both
  phases and their ratio, and the noisy tenant's tokens/s.
"""
from __future__ import annotations

import asyncio
import socket
import sys
from urllib.parse import urlsplit
from typing import Any, Callable

from llmctl.common import protocol as p
from llmctl.common.stats import percentile
from llmctl.tools.bench_load import Workload, closed_loop
from llmctl.tools.bench_stats import RequestRecord, summarize, wall_time

COUNTING = {"prompt": ", ".join(str(i) for i in range(1, 12)) + ","}   # greedy: counts on
SHORT = {"messages": [{"role": "user", "content": "Say hello."}]}


def _ms(values: list[float], q: float) -> float | None:
    return percentile(values, q) * 1000 if values else None


def _figures(records: list[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    return {"requests": len(records), "ok": len(ok),
            "errors": sorted({r.error for r in records if not r.ok}),
            "ttft_p50_ms": _ms(ttft, 50), "ttft_p99_ms": _ms(ttft, 99),
            "e2e_p50_ms": _ms(e2e, 50), "e2e_p99_ms": _ms(e2e, 99),
            "ttft_max_ms": max(ttft) * 1000 if ttft else None,
            "ttft_ms": [round(t * 1000, 1) for t in ttft]}


async def short_behind_long(target: Any, args: Any,
                            advance: Callable[[RequestRecord], None]) -> dict[str, Any]:
    long_work = Workload([COUNTING], args.long_tokens, 0.0)
    stop = asyncio.Event()
    long_records: list[RequestRecord] = []

    async def longs() -> None:
        t = asyncio.create_task(closed_loop(target, long_work, args.long, None, 10**6,
                                            long_records.append, first_index=10_000))
        await stop.wait()
        t.cancel()

    runner = asyncio.create_task(longs())
    await asyncio.sleep(args.settle)         # the long clients hold every slot
    short = await closed_loop(target, Workload([SHORT], 8, 0.0), 1, args.trials, None,
                              advance)
    stop.set()
    await asyncio.gather(runner, return_exceptions=True)
    out = {"scenario": "short-behind-long", "long_clients": args.long,
           "long_tokens": args.long_tokens, "short": _figures(short)}
    done = [r for r in long_records if r.ok]
    out["long_finished"] = len(done)
    return out


async def _non_reader(host: str, port: int, tokens: int, token: str | None) -> Any:
    """A connection that asks for ``tokens`` and never reads (its kernel soon stops
    taking bytes: a 4 KB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(p.hello(token_=token) + p.generate(1, prompt=COUNTING["prompt"],
                                                   max_tokens=tokens, temperature=0))
    return writer


async def non_readers(target: Any, args: Any,
                      advance: Callable[[RequestRecord], None]) -> dict[str, Any]:
    u = urlsplit(target.url)
    if u.scheme != "tcp":
        raise ValueError("--scenario non-readers needs a tcp:// target")
    writers = [await _non_reader(u.hostname or "", u.port or 0, args.long_tokens, args.token)
               for _ in range(args.non_readers)]
    try:
        await asyncio.sleep(args.settle)          # they fill the slots
        readers = await closed_loop(target, Workload([SHORT], args.max_tokens, 0.7),
                                    args.readers, args.readers * args.trials, None, advance)
    finally:
        for w in writers:
            w.transport.abort()
    f = _figures(readers)
    return {"scenario": "non-readers", "non_readers": args.non_readers,
            "readers": args.readers, "reader_tokens": args.max_tokens, "readers_figures": f,
            "reader_errors": {e: sum(1 for r in readers if r.error == e)
                              for e in {r.error for r in readers if not r.ok}}}


async def tenants(quiet: Any, noisy: Any, args: Any,
                  advance: Callable[[RequestRecord], None]) -> dict[str, Any]:
    work = Workload([SHORT], args.max_tokens, args.temperature)
    alone = await closed_loop(quiet, work, 1, None, args.duration, advance)
    noise: list[RequestRecord] = []
    noisy_task = asyncio.create_task(closed_loop(noisy, work, args.noisy_clients, None,
                                                 args.duration + args.settle, noise.append,
                                                 first_index=10_000, ramp_s=1.0))
    await asyncio.sleep(args.settle)
    beside = await closed_loop(quiet, work, 1, None, args.duration, advance,
                               first_index=20_000)
    await noisy_task
    a, b = _figures(alone), _figures(beside)
    ratio = {k: (b[k] / a[k] if a[k] and b[k] else None) for k in ("ttft_p50_ms", "ttft_p99_ms")}
    return {"scenario": "tenants", "noisy_clients": args.noisy_clients, "quiet_alone": a,
            "quiet_beside_noisy": b, "ratio": ratio,
            "noisy_tokens_per_s": summarize(noise, wall_time(noise))["tokens_per_s"],
            "noisy_errors": sorted({r.error for r in noise if not r.ok})}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_fairness(res: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    if res["scenario"] == "short-behind-long":
        s = res["short"]
        print(f"short-behind-long: {res['long_clients']} clients asking for "
              f"{res['long_tokens']} tokens; {s['ok']}/{s['requests']} short requests "
              f"(8 tokens){'; errors ' + ', '.join(s['errors']) if s['errors'] else ''}",
              file=out)
        print(f"  short TTFT p50 {_fmt(s['ttft_p50_ms'])} ms, p99 {_fmt(s['ttft_p99_ms'])} ms,"
              f" max {_fmt(s['ttft_max_ms'])} ms; end p50 {_fmt(s['e2e_p50_ms'])} ms, p99 {_fmt(s['e2e_p99_ms'])} ms; long "
              f"requests finished meanwhile: {res['long_finished']}", file=out)
        return
    if res["scenario"] == "non-readers":
        f = res["readers_figures"]
        print(f"non-readers: {res['non_readers']} connections that do not read, "
              f"{res['readers']} clients that do ({res['reader_tokens']} tokens a request): "
              f"{f['ok']}/{f['requests']} reader requests ended DONE"
              f"{'; ' + str(res['reader_errors']) if res['reader_errors'] else ''}", file=out)
        print(f"  readers' TTFT p50 {_fmt(f['ttft_p50_ms'])} ms, p99 {_fmt(f['ttft_p99_ms'])}"
              f" ms, max {_fmt(f['ttft_max_ms'])} ms; end p99 {_fmt(f['e2e_p99_ms'])} ms",
              file=out)
        return
    a, b, r = res["quiet_alone"], res["quiet_beside_noisy"], res["ratio"]
    print(f"tenants: a quiet tenant's sequential client, alone and beside "
          f"{res['noisy_clients']} clients of a noisy one", file=out)
    for label, f in (("alone", a), ("beside noisy", b)):
        print(f"  {label:13} TTFT p50 {_fmt(f['ttft_p50_ms']):>6} ms  p99 "
              f"{_fmt(f['ttft_p99_ms']):>6} ms  ({f['ok']}/{f['requests']} ok)", file=out)
    ratio = " / ".join("-" if v is None else f"{v:.2f}" for v in r.values())
    print(f"  ratio beside/alone p50 / p99: {ratio}; noisy tenant "
          f"{res['noisy_tokens_per_s']:.1f} tokens/s"
          f"{', errors ' + ', '.join(res['noisy_errors']) if res['noisy_errors'] else ''}",
          file=out)
