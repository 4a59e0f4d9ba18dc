"""What the load generator (tools/bench.py) prints and draws: the machine, a table per run,
the overload figures, a PNG of latency and throughput."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

MODES = {"closed": "closed loop", "open": "open loop", "overload": "overload",
         "engine": "closed loop, the engine in-process"}


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


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_report(result: dict[str, Any], console: Any = None) -> None:
    """The tables of a run: the terminal's width at a terminal, whole lines in a pipe or
    a file (``common.console``)."""
    from rich.table import Table

    from llmctl.common.console import console as cli_console
    console = console or cli_console()
    m = result["machine"]
    cfg = result["config"]
    table = Table(title=f"llmctl bench: {cfg['max_tokens']} max tokens, {MODES[cfg['mode']]} - "
                        f"{m['cpu_model']}, {m['cores']} cores")
    load = {"open": "rate/s", "overload": "clients|rate/s"}.get(cfg["mode"], "clients")
    for col in ("target", load, "ok", "errors",
                "tok/s", "req/s", "tok/req", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                "E2E p50", "E2E p95", "E2E p99"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for p in result["points"]:
        s = p["summary"]
        errs = ", ".join(f"{k}:{v}" for k, v in s["errors"].items()) or "0"
        table.add_row(p["target"], str(p["clients"]) if p["rate"] is None else f"{p['rate']:.3g}",
                      str(s["ok"]), errs, _f(s["tokens_per_s"]), _f(s["requests_per_s"], "{:.2f}"),
                      _f(s["tokens_per_request"]), _f(s["ttft_ms"]["p50"]), _f(s["ttft_ms"]["p99"]),
                      _f(s["itl_pooled_ms"]["p50"]), _f(s["itl_pooled_ms"]["p99"]),
                      _f(s["e2e_ms"]["p50"]), _f(s["e2e_ms"]["p95"]), _f(s["e2e_ms"]["p99"]))
    console.print(table)
    extra = [(p, p["summary"]) for p in result["points"]
             if p["summary"].get("added_ms", {}).get("count") or "gateway_cpu_s" in p["summary"]]
    if extra:
        xt = Table(title="the data plane's share")
        for col in ("target", "clients", "added p50", "added p99", "added max",
                    "gateway CPU ms / 1k tokens"):
            xt.add_column(col, justify="left" if col == "target" else "right")
        for p, s in extra:
            a = s.get("added_ms") or {}
            xt.add_row(p["target"], str(p["clients"]), _f(a.get("p50"), "{:.2f}"),
                       _f(a.get("p99"), "{:.2f}"), _f(a.get("max"), "{:.2f}"),
                       _f(s.get("gateway_cpu_ms_per_1k_tokens"), "{:.1f}"))
        console.print(xt)
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
    if result.get("overload"):
        print_overload(result["overload"], console)


def print_overload(o: dict[str, Any], console: Any) -> None:
    over, retry = o["overloaded_ms"], o["retry_after_ms"]
    console.print(f"capacity {o['capacity_rps']:.3g} req/s; offered {o['factor']:g}x = "
                  f"{o['offered_rps']:.3g} req/s for {o['offered_s']:.0f} s; sent {o['sent']}: "
                  + ", ".join(f"{k} {v}" for k, v in o["outcomes"].items()))
    console.print(f"time to answer overloaded: p50 {_f(over['p50'], '{:.2f}')} ms, "
                  f"p99 {_f(over['p99'], '{:.2f}')} ms, max {_f(over['max'], '{:.2f}')} ms "
                  f"(n={over['count']})")
    console.print(f"retry_after_ms: min {retry['min']}, p50 {retry['p50']}, max {retry['max']}")
    rss = [mib for _, mib in o.get("gateway_rss_mib") or []]
    if rss:
        console.print(f"gateway RSS: start {rss[0]} MiB, max {max(rss)} MiB, end {rss[-1]} MiB")


def plot(result: dict[str, Any], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    closed = result["config"]["mode"] in ("closed", "engine")
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
    xs_all = [p["clients"] if closed else p["rate"] for p in result["points"]]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 32:   # 1..256 clients
        for ax in (lat, thr):
            ax.set_xscale("log", base=2)
    lat.legend(fontsize=6)
    thr.legend(fontsize=6)
    m = result["machine"]
    fig.suptitle(f"{result['config']['max_tokens']} max tokens - {m['cpu_model']}, "
                 f"{m['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
