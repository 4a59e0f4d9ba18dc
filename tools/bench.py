"""The load generator of llmctl, for llmctl and any OpenAI-compatible server (docs/benchmarks.md).

    python -m llmctl.tools.bench --target tcp://127.0.0.1:8080 --clients 1,2,4,8 --requests 32 \
        --max-tokens 64 --json bench.json --plot bench.png
    python -m llmctl.tools.bench --target http://127.0.0.1:8090/v1 --rate 2 --duration 60
    python -m llmctl.tools.bench --target tcp://127.0.0.1:8080 --compare http://127.0.0.1:8090/v1
    python -m llmctl.tools.bench --target tcp://127.0.0.1:8080 --overload 4 --duration 30 -c config.toml
    python -m llmctl.tools.bench --engine models/SmolLM2-135M-Instruct.Q4_1.gguf --clients 1,8
    python -m llmctl.tools.bench --target http://127.0.0.1:8081/v1 --compare http://127.0.0.1:8090/v1 \
        --neighbours 0,1,2 --requests 8 --clients 8 --duration 10 --max-tokens 32

(``llmctl bench ...`` is the same command.) Closed loop by default: N clients each send a
request, wait for its end, send the next. ``--rate R`` is open loop instead: Poisson
arrivals at R requests/s, however many are in flight. ``--overload F`` measures the
capacity (closed loop, ``--clients``) and then offers F times it, Poisson, and reports how
fast ``overloaded`` is answered (tools/bench_overload.py). ``--neighbours N,...`` starts N
CPU-bound processes beside the targets and measures sequential latency, tokens/s at
``--clients`` and where each server's threads spend the time (tools/bench_neighbours.py).
``--engine MODEL.gguf`` drives
the batching engine directly in a worker-side process, no gateway (tools/bench_engine.py).
Each point first runs ``--warmup`` requests at its concurrency, left out of the figures.
Targets: ``tcp://HOST:PORT`` (llmctl's wire protocol), ``cc50://HOST:PORT`` (the seed's CC50
framing on the same port), ``http://HOST:PORT/v1`` (OpenAI API),
``bare:MODEL.gguf?threads=N`` (llama-cpp-python in this process, see tools/bare_llama.py).
Percentiles are nearest-rank (``common.stats``).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from llmctl.common.client import now
from llmctl.tools.bare_llama import BareLlamaTarget
from llmctl.tools.bench_engine import EngineTarget
from llmctl.common.prompts import load_prompts
from llmctl.tools.bench_load import BUILTIN_PROMPTS, Workload, closed_loop, open_loop
from llmctl.tools.bench_embed import run_embeddings
from llmctl.tools.bench_fairness import non_readers, print_fairness, short_behind_long, tenants
from llmctl.tools.bench_neighbours import print_neighbours, run_neighbours
from llmctl.tools.bench_overload import run_overload
from llmctl.tools.bench_report import machine_info, plot, print_report
from llmctl.tools.bench_stats import RequestRecord, compare, summarize, wall_time
from llmctl.tools.bench_targets import Cc50Target, HttpTarget, Target, TcpTarget
from llmctl.tools.service_status import status as service_status

__all__ = ["BUILTIN_PROMPTS", "Workload", "closed_loop", "open_loop", "load_prompts", "main",
           "make_target"]


def make_target(url: str, **options: Any) -> Target:
    scheme = urlsplit(url).scheme
    if scheme == "tcp":
        return TcpTarget(url, token=options.get("token"), timeout=options.get("timeout", 300.0),
                         stamped=options.get("stamped", False))
    if scheme in ("http", "https"):
        return HttpTarget(url, model=options.get("model"), timeout=options.get("timeout", 300.0),
                          api_key=options.get("api_key"), stamped=options.get("stamped", False))
    if scheme == "cc50":
        return Cc50Target(url, timeout=options.get("timeout", 300.0))
    if scheme == "bare":
        return BareLlamaTarget.from_url(url)      # imports llama_cpp only when opened
    raise ValueError(f"unsupported target {url!r}: use tcp://HOST:PORT, cc50://HOST:PORT, "
                     "http://HOST:PORT/v1 or bare:MODEL.gguf")


# ---- running a point --------------------------------------------------------------------

@contextlib.contextmanager
def collector_paused() -> Any:
    """The load generator's cyclic garbage collector is off while a point runs and collects
    between points: one of its passes stops every stream the generator reads at once (one
    took 15 ms at 64 clients), which the figures would count as the target's latency. What
    a point allocates is freed by reference counting; what is left is collected after."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


async def run_point(target: Target, work: Workload, args: argparse.Namespace, clients: int,
                    rate: float | None, progress: "Progress") -> dict[str, Any]:
    label = f"{target.url} " + (f"rate={rate:g}/s" if rate else f"clients={clients}")
    with collector_paused():
        records, cpu = await _measure(target, work, args, clients, rate, progress, label)
    summary = summarize(records, wall_time(records))
    if cpu is not None:
        summary["gateway_cpu_s"] = cpu
        summary["gateway_cpu_ms_per_1k_tokens"] = (
            cpu * 1e6 / summary["tokens_out"] if summary["tokens_out"] else None)
    point: dict[str, Any] = {"target": target.url, "clients": None if rate else clients,
                             "rate": rate, "summary": summary}
    if args.raw:
        t0 = min((r.t_start for r in records), default=0.0)
        point["records"] = [r.to_dict(t0) for r in records]
    return point


async def _measure(target: Target, work: Workload, args: argparse.Namespace, clients: int,
                   rate: float | None, progress: "Progress",
                   label: str) -> tuple[list[RequestRecord], float | None]:
    """One point's records, and the gateway's CPU seconds in it when ``-c`` names it."""
    cpu0 = 0.0
    if isinstance(target, EngineTarget):
        progress.start(label, args.requests)
        records = await target.closed_loop(work, clients, args.requests, args.warmup,
                                           progress.advance)
    else:
        if args.warmup:
            progress.start(f"{target.url} warm-up", args.warmup)
            await closed_loop(target, work, clients if rate is None else 1, args.warmup, None,
                              progress.advance, first_index=10_000)
        progress.start(label, args.requests, args.duration)
        duration = None if args.requests else args.duration
        cpu0 = cpu_seconds(args.cpu_pid)
        if rate:
            records = await open_loop(target, work, rate, args.requests, duration,
                                      progress.advance, seed=args.seed or 0)
        else:
            records = await closed_loop(target, work, clients, args.requests, duration,
                                        progress.advance, ramp_s=args.ramp)
    progress.stop()
    if args.cpu_pid is None or isinstance(target, EngineTarget):
        return records, None
    return records, cpu_seconds(args.cpu_pid) - cpu0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds process ``pid`` has used (0 without one)."""
    if pid is None:
        return 0.0
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class Progress:
    """A rich progress bar on stderr (nothing when quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.bar = None
        self.task: Any = None
        self._ticker: asyncio.Task | None = None
        if not quiet:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn)
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("{task.fields[errors]}"),
                                    console=Console(stderr=True), transient=True)
        self.errors = 0
        self.by_time = False

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.bar is not None:
            self.bar.stop()

    def start(self, label: str, requests: int | None, duration: float | None = None) -> None:
        self.stop()
        self.errors = 0
        self.by_time = requests is None
        if self.bar is None:
            return
        total = requests if requests is not None else duration
        self.task = self.bar.add_task(label, total=total, errors="")
        if self.by_time:
            t0 = now()

            async def tick() -> None:
                while True:
                    self.bar.update(self.task, completed=min(now() - t0, total))
                    await asyncio.sleep(0.25)
            self._ticker = asyncio.create_task(tick())

    def advance(self, rec: RequestRecord) -> None:
        if not rec.ok:
            self.errors += 1
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=0 if self.by_time else 1,
                            errors=f"[red]{self.errors} errors" if self.errors else "")

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None


# ---- the run ---------------------------------------------------------------------------

def mode_of(args: argparse.Namespace) -> str:
    if args.scenario:
        return args.scenario
    if args.neighbours is not None:
        return "neighbours"
    if args.overload:
        return "overload"
    if args.engine:
        return "engine"
    return "open" if args.rate else "closed"


def points_of(args: argparse.Namespace) -> list[tuple[int, float | None]]:
    if args.rate:
        return [(1, r) for r in args.rate]
    return [(c, None) for c in args.clients]


async def run_async(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    work = Workload(args.prompts_list, args.max_tokens, args.temperature, args.seed, args.ignore_eos)
    points: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if args.config and not args.overload:      # the gateway whose CPU each point measures
        st = await asyncio.to_thread(service_status, args.config)
        if not st.get("running"):
            raise ConnectionError(f"llmctl is not running with {args.config}")
        args.cpu_pid = st["gateway"]["pid"]
    try:
        for t in targets:
            await t.open()
        with Progress(args.quiet) as progress:
            if args.overload:
                got = await run_overload(targets[0], work, args, progress.start, progress.advance)
                points, extra["overload"] = got["points"], got["overload"]
            if args.neighbours is not None:
                extra["neighbours"] = await run_neighbours(targets, work, args, progress.start,
                                                           progress.advance)
            if args.scenario == "short-behind-long":
                extra["fairness"] = await short_behind_long(targets[0], args, progress.advance)
            elif args.scenario == "non-readers":
                extra["fairness"] = await non_readers(targets[0], args, progress.advance)
            elif args.scenario == "tenants":
                extra["fairness"] = await tenants(targets[0], targets[1], args,
                                                  progress.advance)
            for n, (clients, rate) in enumerate([] if args.overload or args.scenario
                                                or args.neighbours is not None
                                                else points_of(args)):
                order = targets if n % 2 == 0 else targets[::-1]   # alternate who goes first
                got = {t.url: await run_point(t, work, args, clients, rate, progress) for t in order}
                points.extend(got[t.url] for t in targets)
    finally:
        for t in targets:
            await t.close()
    mode = mode_of(args)
    result: dict[str, Any] = {
        "tool": "llmctl-bench/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "targets": [t.url for t in targets], "mode": mode,
            "clients": None if args.rate else args.clients, "rate": args.rate,
            "overload": args.overload, "capacity_s": args.capacity_s if args.overload else None,
            "requests": args.requests, "duration_s": None if args.requests else args.duration,
            "warmup": args.warmup, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed, "ignore_eos": args.ignore_eos,
            "prompts": args.prompts or "builtin", "prompt_count": len(args.prompts_list),
        },
        "machine": machine_info(),
        "servers": {t.url: t.info for t in targets},
        "points": points,
        **extra,
    }
    if len(targets) == 2 and points:
        a, b = targets[0].url, targets[1].url
        by = {(p["target"], p["clients"], p["rate"]): p["summary"] for p in points}
        result["comparisons"] = [
            {"clients": c if r is None else None, "rate": r, "a": a, "b": b,
             "ratios": compare(by[(a, None if r else c, r)], by[(b, None if r else c, r)])}
            for c, r in points_of(args)]
    return result


# ---- the command ---------------------------------------------------------------------------

def _list(kind: type) -> Callable[[str], list]:
    def parse(s: str) -> list:
        try:
            vs = [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {s!r}") from None
        if not vs or any(v <= 0 for v in vs):
            raise argparse.ArgumentTypeError(f"expected positive values: {s!r}")
        return vs
    return parse


def build_parser(prog: str = "python -m llmctl.tools.bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="tcp://HOST:PORT, http://HOST:PORT/v1 or bare:MODEL.gguf")
    what.add_argument("--engine", metavar="MODEL.gguf",
                      help="drive the batching engine directly (closed loop, no gateway)")
    ap.add_argument("--compare", metavar="TARGET2",
                    help="run the same workload against TARGET2 too, alternating points")
    ap.add_argument("--clients", type=_list(int), default=None, metavar="N[,N...]",
                    help="concurrent clients (closed loop); several make a sweep (default 1)")
    ap.add_argument("--rate", type=_list(float), default=None, metavar="R[,R...]",
                    help="open loop: Poisson arrivals at R requests/s (a sweep when several)")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per point "
                    "(default 20 unless --duration)")
    ap.add_argument("--duration", type=float, default=None, metavar="S",
                    help="measure each point for S seconds instead (in-flight requests finish)")
    ap.add_argument("--warmup", type=int, default=2, help="requests per point left out (default 2)")
    ap.add_argument("--ramp", type=float, default=0.0, metavar="S",
                    help="closed loop: start the clients spread over S seconds instead of at "
                         "once (about one request's length keeps them out of step)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=None, help="request i gets seed SEED+i")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="ask the server to generate max-tokens whatever (llama-server, bare:)")
    ap.add_argument("--prompts", metavar="FILE.jsonl", help="{\"prompt\"} or {\"messages\"} lines")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--token", default=None, help="HELLO token (tcp://)")
    ap.add_argument("--model", default=None, help="model name sent to http:// targets")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--raw", action="store_true", help="include every request in the JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of latency and tokens/s")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    ap.add_argument("--stamped", action="store_true",
                    help="the target's tokens are stamped by synthetic workers ([synthetic] "
                         "stamp = true): report the latency the data plane adds per token")
    fa = ap.add_argument_group("predictable latency (--scenario)")
    fa.add_argument("--scenario", choices=("short-behind-long", "non-readers", "tenants"),
                    default=None,
                    help="short-behind-long: --trials short requests beside --long clients "
                         "asking for --long-tokens; non-readers: --readers clients beside "
                         "--non-readers connections that never read; tenants: a quiet "
                         "tenant's client alone and beside --noisy-clients of a noisy one "
                         "(--quiet-key, --noisy-key)")
    fa.add_argument("--long", type=int, default=12, help="clients asking for long answers")
    fa.add_argument("--long-tokens", type=int, default=1500)
    fa.add_argument("--trials", type=int, default=20, help="short requests, one at a time")
    fa.add_argument("--settle", type=float, default=5.0, metavar="S",
                    help="seconds the long or noisy clients run before the measure")
    fa.add_argument("--quiet-key", default=None)
    fa.add_argument("--noisy-key", default=None)
    fa.add_argument("--noisy-clients", type=int, default=32)
    fa.add_argument("--non-readers", type=int, default=50)
    fa.add_argument("--readers", type=int, default=8)
    nb = ap.add_argument_group("busy neighbours (--neighbours)")
    nb.add_argument("--neighbours", type=_counts, default=None, metavar="N[,N...]",
                    help="for each N: start N CPU-bound processes, then measure --requests "
                         "sequential requests (default 8) and --clients closed-loop clients "
                         "for --duration s (default 8 for 10 s) against each target; "
                         "--timeout defaults to 60 s")
    ov = ap.add_argument_group("overload (--overload)")
    ov.add_argument("--overload", type=float, default=None, metavar="FACTOR",
                    help="offer FACTOR x the measured capacity, Poisson, for --duration "
                         "(default 30 s)")
    ov.add_argument("--capacity-s", type=float, default=5.0, metavar="S",
                    help="seconds of closed loop (--clients) that measure the capacity")
    ov.add_argument("-c", "--config", default=None,
                    help="config of the llmctl under test: report its gateway's CPU per "
                         "1,000 tokens at every point (with --compare, both targets should "
                         "be its fronts); with --overload: sample its RSS")
    ap.add_argument("--embeddings", type=_list(int), default=None, metavar="N[,N...]",
                    help="measure POST /v1/embeddings with N inputs a request (http:// target; "
                         "tools/bench_embed.py)")
    en = ap.add_argument_group("engine (--engine)")
    en.add_argument("--slots", type=int, default=None, help="default: the most --clients")
    en.add_argument("--threads", type=int, default=None, help="default: all cores")
    en.add_argument("--n-ctx", type=int, default=None, help="per slot (default: the config's)")
    en.add_argument("--n-batch", type=int, default=None, help="default: the config's")
    en.add_argument("--n-gpu-layers", type=int, default=None, help="default: 0, the CPU")
    en.add_argument("--kv-unified", action="store_true", help="one KV buffer for all slots")
    return ap


def _counts(s: str) -> list[int]:
    try:
        vs = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list: {s!r}") from None
    if not vs or any(v < 0 or v > 64 for v in vs):
        raise argparse.ArgumentTypeError(f"expected counts from 0 to 64: {s!r}")
    return vs


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.clients_point = None
    if args.scenario == "tenants" and not (args.quiet_key and args.noisy_key):
        ap.error("--scenario tenants needs --quiet-key and --noisy-key")
    if args.scenario and args.duration is None:
        args.duration = 20.0
    if args.neighbours is not None:
        if args.engine or args.rate or args.overload or len(args.clients or ()) > 1:
            ap.error("--neighbours takes one --clients (the throughput point's), without "
                     "--engine, --rate or --overload")
        args.clients_point = args.clients[0] if args.clients else 8
        args.requests = args.requests or 8
        args.duration = args.duration or 10.0
        if args.timeout == 300.0:
            args.timeout = 60.0
    args.clients = args.clients or [1]
    if args.overload is not None:
        if args.overload <= 0 or args.capacity_s <= 0:
            ap.error("--overload and --capacity-s must be positive")
        if args.compare or args.rate or args.engine or args.plot or len(args.clients) > 1:
            ap.error("--overload takes one --target and one --clients (the capacity's), "
                     "without --compare, --rate, --engine or --plot")
        if args.requests is None and args.duration is None:
            args.duration = 30.0
    if args.engine and (args.compare or args.rate or args.duration):
        ap.error("--engine is a closed loop of --requests: it takes no --compare, --rate "
                 "or --duration")
    args.cpu_pid = None
    if args.requests is None and args.duration is None:
        args.requests = 20
    if args.requests is not None and args.requests <= 0:
        ap.error("--requests must be positive")
    if args.duration is not None and args.duration <= 0:
        ap.error("--duration must be positive")
    if args.rate and args.clients != [1]:
        ap.error("--rate is open loop: it does not take --clients")
    if args.max_tokens <= 0 or args.warmup < 0:
        ap.error("--max-tokens must be positive and --warmup not negative")
    try:
        args.prompts_list = load_prompts(args.prompts) if args.prompts else BUILTIN_PROMPTS
    except (OSError, ValueError) as exc:
        ap.error(str(exc))


def _run_loop(coro: Any) -> Any:
    """On uvloop when it is installed: the load generator shares the CPU with what it
    measures, and every microsecond it spends per token is one the target loses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def execute(args: argparse.Namespace, targets: list[Target]) -> int:
    """Run, print, write the files; 0 when every point had a successful request."""
    try:
        result = _run_loop(run_async(args, targets))
    except (OSError, ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result["config"]["mode"] == "neighbours":
        print_neighbours(result["neighbours"])
    elif "fairness" in result:
        print_fairness(result["fairness"])
    else:
        print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if "fairness" in result:
        return 0
    if "neighbours" in result:
        return 0 if all(t["sequential"]["ok"] > 0 for p in result["neighbours"]["points"]
                        for t in p["targets"]) else 1
    return 0 if all(p["summary"]["ok"] > 0 for p in result["points"]) else 1


def main(argv: list[str] | None = None, prog: str = "python -m llmctl.tools.bench") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.embeddings:
        return run_embeddings(args)
    if args.engine:
        targets: list[Target] = [EngineTarget(
            args.engine, args.slots or max(args.clients), args.threads, args.n_ctx,
            args.n_batch, args.n_gpu_layers, args.kv_unified)]
    else:
        opts = {"token": args.token, "model": args.model, "timeout": args.timeout,
                "api_key": args.api_key, "stamped": args.stamped}
        if args.scenario == "tenants":      # one target per tenant, its key both ways
            runs = [(args.target, {**opts, "token": k, "api_key": k})
                    for k in (args.quiet_key, args.noisy_key)]
        else:
            runs = [(u, opts) for u in (args.target, args.compare) if u]
        try:
            targets = [make_target(u, **o) for u, o in runs]
        except ValueError as exc:
            ap.error(str(exc))
        if len(targets) == 2 and targets[0].url == targets[1].url and not args.scenario:
            ap.error("--compare needs a different target")
    return execute(args, targets)


if __name__ == "__main__":
    sys.exit(main(prog=os.environ.get("LLMCTL_PROG", "python -m llmctl.tools.bench")))
