"""Latency beside busy neighbours: ``llmctl bench --neighbours 0,1,2`` (docs/benchmarks.md,
"Sharing the host").

For each neighbour count N the benchmark starts N CPU-bound processes (``python -c 'while
True: pass'``) in its own session, as a user's job beside the service would run, and then
measures each target in turn (side by side, the same neighbours):

* sequential: ``--requests`` requests one after another (no warm-up: the first one counts);
  median and worst latency;
* throughput: ``--clients`` closed-loop clients for ``--duration`` seconds; tokens/s;
* where the time goes: every thread of the target's processes (found from the process
  listening on its port), its CPU time and its run-queue wait during the sequential
  phase (``/proc/PID/task/*/schedstat``), per output token.

Bounded in time: a request gets ``--timeout`` seconds (60 by default here), the
throughput phase ``--duration`` plus one timeout; the neighbours are killed when a point
ends, however it ends.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from llmctl.common.procs import die_with_parent, thread_times
from llmctl.tools.bench_load import Workload, closed_loop
from llmctl.tools.bench_stats import RequestRecord, summarize, wall_time
from llmctl.tools.bench_targets import Target

NEIGHBOUR = "while True: pass"


def server_processes(url: str) -> list[int]:
    """The processes of the server listening on ``url``'s port: the listener and its
    descendants, or, when the listener's parent leads a session of its own (a daemon
    such as llmctl's supervisor), every process under that parent."""
    import psutil

    port = urlsplit(url).port
    pid = next((c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                and c.pid), None)
    if pid is None:
        return []
    proc = psutil.Process(pid)
    parent = proc.parent()
    if parent is not None and parent.pid > 1 and os.getsid(parent.pid) == parent.pid \
            and os.getsid(parent.pid) != os.getsid(0):
        proc = parent
    return [proc.pid, *(c.pid for c in proc.children(recursive=True))]


def process_name(pid: int) -> str:
    """A short name of what a process runs: ``-m MODULE``'s last two parts (llmctl's
    ``llmctl.worker``, ...), else its program's name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "-m" in argv[:-1]:
        return ".".join(argv[argv.index("-m") + 1].split(".")[-2:])
    return os.path.basename(argv[0]) or "?"


def _snapshot(pids: list[int]) -> dict[tuple[int, int], tuple[str, str, int, int, int]]:
    out = {}
    for pid in pids:
        comm = process_name(pid)
        for tid, (name, run, wait, slices) in thread_times(pid, names=True).items():
            out[(pid, tid)] = (comm, name, run, wait, slices)
    return out


def thread_report(before: dict, after: dict, tokens: int, wall_s: float) -> list[dict[str, Any]]:
    """Threads that ran or waited at least 1% of the phase, busiest first."""
    rows = []
    for key, (comm, name, run, wait, slices) in after.items():
        b = before.get(key)
        if b is None:
            continue
        d_run, d_wait, d_slices = run - b[2], wait - b[3], slices - b[4]
        if (d_run + d_wait) < 0.01 * wall_s * 1e9:
            continue
        rows.append({"pid": key[0], "tid": key[1], "process": comm, "thread": name,
                     "run_ms": d_run / 1e6, "wait_ms": d_wait / 1e6, "slices": d_slices,
                     "run_ms_per_token": d_run / 1e6 / tokens if tokens else None,
                     "wait_ms_per_token": d_wait / 1e6 / tokens if tokens else None})
    return sorted(rows, key=lambda r: -(r["run_ms"] + r["wait_ms"]))


def _autogroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            fields = f.read().split()
    except OSError:
        return "-"
    return fields[0] if fields else "-"  # empty where the kernel runs without autogroups


def start_neighbours(n: int) -> list[subprocess.Popen]:
    """N CPU-bound processes, which the kernel kills if the benchmark dies first."""
    return [subprocess.Popen([sys.executable, "-c", NEIGHBOUR], preexec_fn=die_with_parent)
            for _ in range(n)]


def stop_neighbours(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


async def _sequential(target: Target, work: Workload, n: int,
                      advance: Callable[[RequestRecord], None]) -> list[RequestRecord]:
    return await closed_loop(target, work, 1, n, None, advance)


async def measure_target(target: Target, work: Workload, args: Any,
                         advance: Callable[[RequestRecord], None]) -> dict[str, Any]:
    pids = server_processes(target.url)
    before = _snapshot(pids)
    seq = await _sequential(target, work, args.requests, advance)
    after = _snapshot(pids)
    seq_sum = summarize(seq, wall_time(seq))
    lat = [r.e2e for r in seq if r.ok and r.e2e is not None]
    out: dict[str, Any] = {
        "target": target.url, "pids": pids,
        "autogroup": _autogroup(pids[0]) if pids else "-",
        "sequential": {"requests": len(seq), "ok": len(lat), "errors": seq_sum["errors"],
                       "median_s": statistics.median(lat) if lat else None,
                       "worst_s": max((r.e2e or args.timeout) if r.ok else args.timeout
                                      for r in seq) if seq else None,
                       "tokens": seq_sum["tokens_out"], "wall_s": seq_sum["wall_s"]},
        "threads": thread_report(before, after, seq_sum["tokens_out"], seq_sum["wall_s"]),
    }
    if args.clients_point:
        recs = await closed_loop(target, work, args.clients_point, None, args.duration,
                                 advance, first_index=1000)
        s = summarize(recs, wall_time(recs))
        out["throughput"] = {"clients": args.clients_point, "tokens_per_s": s["tokens_per_s"],
                             "ok": s["ok"], "errors": s["errors"], "wall_s": s["wall_s"]}
    return out


async def run_neighbours(targets: list[Target], work: Workload, args: Any,
                         start: Callable[..., None],
                         advance: Callable[[RequestRecord], None]) -> dict[str, Any]:
    points = []
    for n in args.neighbours:
        procs = start_neighbours(n)
        try:
            point: dict[str, Any] = {"neighbours": n, "neighbours_autogroup":
                                     _autogroup(procs[0].pid) if procs else "-",
                                     "neighbour_pids": [p.pid for p in procs], "targets": []}
            for target in targets:
                start(f"{target.url} neighbours={n}", args.requests)
                t0 = time.monotonic()
                got = await measure_target(target, work, args, advance)
                got["elapsed_s"] = time.monotonic() - t0
                point["targets"].append(got)
            points.append(point)
        finally:
            stop_neighbours(procs)
    return {"mode": "neighbours", "max_tokens": work.max_tokens, "points": points}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_neighbours(result: dict[str, Any], out: Any = None) -> None:
    """Plain columns (readable in a pipe or a file), one line per target and point."""
    out = out or sys.stdout
    print(f"busy neighbours: {result['max_tokens']} max tokens per request", file=out)
    head = (f"{'neighbours':>10}  {'target':<28} {'autogroup':<14} {'seq ok':>6} "
            f"{'median s':>9} {'worst s':>8} {'clients':>7} {'tok/s':>8}")
    print(head, file=out)
    for p in result["points"]:
        for t in p["targets"]:
            s, th = t["sequential"], t.get("throughput") or {}
            print(f"{p['neighbours']:>10}  {t['target']:<28} {t['autogroup']:<14} "
                  f"{s['ok']:>3}/{s['requests']:<2} {_fmt(s['median_s'], '9.2f')} "
                  f"{_fmt(s['worst_s'], '8.2f')} {th.get('clients', '-'):>7} "
                  f"{_fmt(th.get('tokens_per_s'), '8.1f')}", file=out)
        if len(p["targets"]) == 2:
            a, b = (t["sequential"] for t in p["targets"])
            ta, tb = ((t.get("throughput") or {}).get("tokens_per_s") for t in p["targets"])
            ratio = (lambda x, y: f"{x / y:.2f}" if x and y else "-")
            print(f"{'':>10}  a/b: median {ratio(a['median_s'], b['median_s'])}, worst "
                  f"{ratio(a['worst_s'], b['worst_s'])}, tok/s {ratio(ta, tb)}", file=out)
    groups = {p["neighbours_autogroup"] for p in result["points"]} - {"-"}
    if groups:
        print(f"the neighbours ran in the benchmark's session ({', '.join(sorted(groups))}); "
              "Linux shares the CPU between sessions (autogroups) first, then between the "
              "threads of a session", file=out)
    for p in result["points"]:
        for t in p["targets"]:
            tokens = t["sequential"]["tokens"]
            print(f"\nthreads of {t['target']} with {p['neighbours']} neighbour(s), sequential "
                  f"phase ({tokens} tokens, {t['sequential']['wall_s']:.1f} s):", file=out)
            print(f"  {'pid':>7} {'tid':>7} {'process':<15} {'thread':<15} {'run ms':>9} "
                  f"{'wait ms':>9} {'slices':>7} {'run/tok':>8} {'wait/tok':>8}", file=out)
            for r in t["threads"]:
                print(f"  {r['pid']:>7} {r['tid']:>7} {r['process'][:15]:<15} "
                      f"{r['thread'][:15]:<15} {r['run_ms']:9.1f} {r['wait_ms']:9.1f} "
                      f"{r['slices']:>7} {_fmt(r['run_ms_per_token'], '8.2f')} "
                      f"{_fmt(r['wait_ms_per_token'], '8.2f')}", file=out)


def run(args: Any, targets: list[Target], run_loop: Callable[[Any], Any],
        progress: Any) -> dict[str, Any]:
    work = Workload(args.prompts_list, args.max_tokens, args.temperature, args.seed)
    return run_loop(run_neighbours(targets, work, args, progress.start, progress.advance))
