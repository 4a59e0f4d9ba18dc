"""A load generator for llmctl and any OpenAI-compatible server (docs/benchmarks.md).

    python -m llmctl.tools.bench --target tcp://127.0.0.1:8080 --clients 1,2,4,8 --requests 32 \
        --max-tokens 64 --json bench.json --plot bench.png
    python -m llmctl.tools.bench --target http://127.0.0.1:8090/v1 --rate 2 --duration 60
    python -m llmctl.tools.bench --target tcp://127.0.0.1:8080 --compare http://127.0.0.1:8090/v1

Closed loop by default: N clients each send a request, wait for its end, send the next.
``--rate R`` is open loop instead: Poisson arrivals at R requests/s, however many are in flight.
Each point first runs ``--warmup`` requests at its concurrency, left out of the figures.
Targets: ``tcp://HOST:PORT`` (llmctl's wire protocol), ``http://HOST:PORT/v1`` (OpenAI API),
``bare:MODEL.gguf`` (llama-cpp-python in this process, see tools/bare_llama.py).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

from llmctl.tools.bench_stats import OVERLOADED, RequestRecord, compare, summarize, wall_time
from llmctl.tools.bench_targets import Target, make_target

now = time.perf_counter

BUILTIN_PROMPTS: list[dict[str, Any]] = [
    {"prompt": "Once upon a time, in a small village by the sea,"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "The three most important ideas in computer science are"},
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Explain how a hash table works."}]},
    {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"messages": [{"role": "user", "content": "Write a haiku about autumn leaves."}]},
    {"prompt": "Recipe for a simple tomato soup. Ingredients:"},
    {"messages": [{"role": "user", "content":
                   "Summarise the plot of Romeo and Juliet in a few sentences, then list its "
                   "main characters and say in one line what each of them wants."}]},
    {"prompt": "Q: Why is the sky blue?\nA:"},
    {"messages": [{"role": "user", "content": "Give me five tips to sleep better."}]},
]


# ---- workload ------------------------------------------------------------------------------

def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """JSONL: one ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}...]}`` a line.

    Blank lines and lines starting with ``#`` are skipped; other keys are kept and sent.
    """
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        has_p, has_m = isinstance(obj.get("prompt"), str), obj.get("messages") is not None
        if has_p == has_m:
            raise ValueError(f"{path}:{n}: needs exactly one of a string \"prompt\" and \"messages\"")
        if has_m and not (isinstance(obj["messages"], list) and obj["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in obj["messages"])):
            raise ValueError(f"{path}:{n}: messages must be a non-empty list of "
                             "{\"role\": str, \"content\": str}")
        out.append(obj)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


class Workload:
    """Request i of a point: prompt i mod len(prompts), with the run's generation settings."""

    def __init__(self, prompts: list[dict[str, Any]], max_tokens: int, temperature: float | None,
                 seed: int | None = None, ignore_eos: bool = False) -> None:
        self.prompts, self.max_tokens, self.temperature = prompts, max_tokens, temperature
        self.seed, self.ignore_eos = seed, ignore_eos

    def spec(self, i: int) -> dict[str, Any]:
        spec = dict(self.prompts[i % len(self.prompts)])
        spec["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            spec["temperature"] = self.temperature
        if self.seed is not None:
            spec["seed"] = (self.seed + i) & 0xFFFFFFFF
        if self.ignore_eos:
            spec["ignore_eos"] = True
        return spec


# ---- running a point --------------------------------------------------------------------

async def closed_loop(target: Target, work: Workload, clients: int, requests: int | None,
                      duration: float | None, on_done: Callable[[RequestRecord], None],
                      first_index: int = 0) -> list[RequestRecord]:
    """``clients`` concurrent senders, back to back, until ``requests`` or ``duration``."""
    counter = itertools.count()
    records: list[RequestRecord] = []
    deadline = now() + duration if duration else None

    async def client() -> None:
        while True:
            if deadline is not None and now() >= deadline:
                return
            i = next(counter)
            if requests is not None and i >= requests:
                return
            rec = await target.request(i, work.spec(first_index + i))
            records.append(rec)
            on_done(rec)
            if rec.error == OVERLOADED:   # a polite client backs off as it is told to
                await asyncio.sleep(min((rec.retry_after_ms or 100) / 1000, 1.0))
            elif rec.error in ("connect_failed", "not_ready"):
                await asyncio.sleep(0.1 if rec.error == "connect_failed" else 0.25)

    await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(records, key=lambda r: r.index)


async def open_loop(target: Target, work: Workload, rate: float, requests: int | None,
                    duration: float | None, on_done: Callable[[RequestRecord], None],
                    seed: int = 0) -> list[RequestRecord]:
    """Poisson arrivals at ``rate``/s, each sent at its scheduled time whatever is in flight."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    tasks = []

    async def one(i: int) -> None:
        rec = await target.request(i, work.spec(i))
        records.append(rec)
        on_done(rec)

    t0 = now()
    t_next = t0
    for i in itertools.count():
        if requests is not None and i >= requests:
            break
        if duration is not None and t_next - t0 >= duration:
            break
        delay = t_next - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        t_next += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.index)


async def run_point(target: Target, work: Workload, args: argparse.Namespace, clients: int,
                    rate: float | None, progress: "Progress") -> dict[str, Any]:
    if args.warmup:
        progress.start(f"{target.url} warm-up", args.warmup)
        await closed_loop(target, work, clients if rate is None else 1, args.warmup, None,
                          progress.advance, first_index=10_000)
    label = f"{target.url} " + (f"rate={rate:g}/s" if rate else f"clients={clients}")
    progress.start(label, args.requests, args.duration)
    duration = None if args.requests else args.duration
    if rate:
        records = await open_loop(target, work, rate, args.requests, duration, progress.advance,
                                  seed=args.seed or 0)
    else:
        records = await closed_loop(target, work, clients, args.requests, duration,
                                    progress.advance)
    progress.stop()
    summary = summarize(records, wall_time(records))
    point: dict[str, Any] = {"target": target.url, "clients": None if rate else clients,
                             "rate": rate, "summary": summary}
    if args.raw:
        t0 = min((r.t_start for r in records), default=0.0)
        point["records"] = [r.to_dict(t0) for r in records]
    return point


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

def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu_model": cpu, "logical_cpus": os.cpu_count(),
                            "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores"] = os.cpu_count()
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def points_of(args: argparse.Namespace) -> list[tuple[int, float | None]]:
    if args.rate:
        return [(1, r) for r in args.rate]
    return [(c, None) for c in args.clients]


async def run_async(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    work = Workload(args.prompts_list, args.max_tokens, args.temperature, args.seed, args.ignore_eos)
    points: list[dict[str, Any]] = []
    try:
        for t in targets:
            await t.open()
        with Progress(args.quiet) as progress:
            for n, (clients, rate) in enumerate(points_of(args)):
                order = targets if n % 2 == 0 else targets[::-1]   # alternate who goes first
                got = {t.url: await run_point(t, work, args, clients, rate, progress) for t in order}
                points.extend(got[t.url] for t in targets)
    finally:
        for t in targets:
            await t.close()
    result: dict[str, Any] = {
        "tool": "llmctl-bench/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "targets": [t.url for t in targets], "mode": "open" if args.rate else "closed",
            "clients": None if args.rate else args.clients, "rate": args.rate,
            "requests": args.requests, "duration_s": None if args.requests else args.duration,
            "warmup": args.warmup, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed, "ignore_eos": args.ignore_eos,
            "prompts": args.prompts or "builtin", "prompt_count": len(args.prompts_list),
        },
        "machine": machine_info(),
        "servers": {t.url: t.info for t in targets},
        "points": points,
    }
    if len(targets) == 2:
        a, b = targets[0].url, targets[1].url
        by = {(p["target"], p["clients"], p["rate"]): p["summary"] for p in points}
        result["comparisons"] = [
            {"clients": c if r is None else None, "rate": r, "a": a, "b": b,
             "ratios": compare(by[(a, None if r else c, r)], by[(b, None if r else c, r)])}
            for c, r in points_of(args)]
    return result


# ---- output ----------------------------------------------------------------------------

def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_report(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    m = result["machine"]
    cfg = result["config"]
    table = Table(title=f"llmctl bench: {cfg['max_tokens']} max tokens, {cfg['mode']} loop - "
                        f"{m['cpu_model']}, {m['cores']} cores")
    for col in ("target", "clients" if cfg["mode"] == "closed" else "rate/s", "ok", "errors",
                "tok/s", "req/s", "tok/req", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                "E2E p50", "E2E p95", "E2E p99"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for p in result["points"]:
        s = p["summary"]
        errs = ", ".join(f"{k}:{v}" for k, v in s["errors"].items()) or "0"
        table.add_row(p["target"], str(p["clients"] if p["rate"] is None else p["rate"]),
                      str(s["ok"]), errs, _f(s["tokens_per_s"]), _f(s["requests_per_s"], "{:.2f}"),
                      _f(s["tokens_per_request"]), _f(s["ttft_ms"]["p50"]), _f(s["ttft_ms"]["p99"]),
                      _f(s["itl_pooled_ms"]["p50"]), _f(s["itl_pooled_ms"]["p99"]),
                      _f(s["e2e_ms"]["p50"]), _f(s["e2e_ms"]["p95"]), _f(s["e2e_ms"]["p99"]))
    console.print(table)
    console.print("latencies in ms; ITL over all gaps between output pieces; "
                  "tok/s and req/s count successful requests over the measured wall time")
    if result.get("comparisons"):
        ct = Table(title="ratios a/b")
        for col in ("point", "tok/s", "req/s", "TTFT p50", "E2E p50", "E2E p99"):
            ct.add_column(col, justify="right")
        for c in result["comparisons"]:
            r = c["ratios"]
            ct.add_row(f"clients={c['clients']}" if c["rate"] is None else f"rate={c['rate']:g}",
                       *(_f(r[k], "{:.2f}") for k in ("tokens_per_s", "requests_per_s",
                                                      "ttft_p50", "e2e_p50", "e2e_p99")))
        console.print(ct)
        console.print(f"a = {result['comparisons'][0]['a']}, b = {result['comparisons'][0]['b']}")


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    closed = result["config"]["mode"] == "closed"
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for url in result["config"]["targets"]:
        pts = [p for p in result["points"] if p["target"] == url]
        xs = [p["clients"] if closed else p["rate"] for p in pts]
        for key, label, style in (("e2e_ms", "E2E", "-"), ("ttft_ms", "TTFT", ":")):
            for q, marker in (("p50", "o"), ("p99", "^")):
                lat.plot(xs, [p["summary"][key][q] for p in pts], style, marker=marker,
                         label=f"{url} {label} {q}")
        thr.plot(xs, [p["summary"]["tokens_per_s"] for p in pts], "-o", label=url)
    xlabel = "concurrent clients" if closed else "offered load (requests/s)"
    lat.set(xlabel=xlabel, ylabel="latency (ms)", title="latency")
    thr.set(xlabel=xlabel, ylabel="tokens/s", title="throughput")
    thr.set_ylim(bottom=0)
    lat.set_ylim(bottom=0)
    lat.legend(fontsize=6)
    thr.legend(fontsize=6)
    m = result["machine"]
    fig.suptitle(f"{result['config']['max_tokens']} max tokens - {m['cpu_model']}, "
                 f"{m['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def build_parser(prog: str = "python -m llmctl.tools.bench", target: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if target:
        ap.add_argument("--target", required=True,
                        help="tcp://HOST:PORT, http://HOST:PORT/v1 or bare:MODEL.gguf")
        ap.add_argument("--compare", metavar="TARGET2",
                        help="run the same workload against TARGET2 too, alternating points")
    ap.add_argument("--clients", type=_list(int), default=[1], metavar="N[,N...]",
                    help="concurrent clients (closed loop); several make a sweep (default 1)")
    ap.add_argument("--rate", type=_list(float), default=None, metavar="R[,R...]",
                    help="open loop: Poisson arrivals at R requests/s (a sweep when several)")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per point "
                    "(default 20 unless --duration)")
    ap.add_argument("--duration", type=float, default=None, metavar="S",
                    help="measure each point for S seconds instead (in-flight requests finish)")
    ap.add_argument("--warmup", type=int, default=2, help="requests per point left out (default 2)")
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
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def execute(args: argparse.Namespace, targets: list[Target]) -> int:
    """Run, print, write the files; 0 when every point had a successful request."""
    try:
        result = asyncio.run(run_async(args, targets))
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all(p["summary"]["ok"] > 0 for p in result["points"]) else 1


def main(argv: list[str] | None = None, prog: str = "python -m llmctl.tools.bench") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    check_args(ap, args)
    opts = {"token": args.token, "model": args.model, "timeout": args.timeout,
            "api_key": args.api_key}
    try:
        targets = [make_target(u, **opts) for u in [args.target, args.compare] if u]
    except ValueError as exc:
        ap.error(str(exc))
    if len(targets) == 2 and targets[0].url == targets[1].url:
        ap.error("--compare needs a different target")
    return execute(args, targets)


if __name__ == "__main__":
    sys.exit(main(prog=os.environ.get("LLMCTL_PROG", "python -m llmctl.tools.bench")))
