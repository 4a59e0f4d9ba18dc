"""What the CLI shows of a status snapshot: `llmctl status`, `llmctl models`, and the
dashboard of `llmctl top`.

Each function is pure in the snapshot (a ``llmctl status --json`` object, or its
``models`` rows), so it is tested by rendering to text.  `status` and `models` print to
``common.console``: the terminal's width at a terminal, whole lines in a pipe or a file.
The dashboard is a fixed 80x24 screen (``top.py`` redraws it).
"""
from __future__ import annotations

import os
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARK = " ▁▂▃▄▅▆▇█"
STATE_COLOURS = {"ready": "green", "busy": "yellow", "fatal": "bold red", "backoff": "red",
                 "starting": "cyan", "draining": "magenta"}


def uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f}s" if v >= 1000 else f"{v:.0f}ms"


def mib(v: float | None) -> str:
    return f"{v:.0f}M" if v is not None else "-"


def sparkline(values: list[int | float]) -> str:
    top = max(values, default=0)
    if top <= 0:
        return SPARK[1] * len(values)
    return "".join(SPARK[min(8, 1 + round(v / top * 7))] if v else SPARK[0] for v in values)


def state_label(w: dict[str, Any]) -> str:
    """A worker's state; in backoff with the time left before its restart."""
    if w["state"] == "backoff" and w.get("restart_in_s") is not None:
        return f"backoff {w['restart_in_s']:.1f}s"
    return w["state"]


def _bar(used: float, total: float, width: int = 20) -> Text:
    frac = 0.0 if total <= 0 else min(1.0, used / total)
    n = round(frac * width)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.7 else "green"
    return Text("█" * n, style=style) + Text("░" * (width - n), style="dim")


def _cache_line(counters: dict[str, int], workers: list[dict[str, Any]]) -> str:
    """Prompt-cache reuse since start, and the host-memory stores' fill."""
    prompt, cached = counters.get("prompt_tokens", 0), counters.get("cache_hit_tokens", 0)
    line = f"prompt cache: {cached} of {prompt} prompt tokens reused"
    if prompt:
        line += f" ({100 * cached / prompt:.0f}%)"
    stores = [w["kv_store"] for w in workers if w.get("kv_store")]
    if stores:
        used = sum(s["bytes"] for s in stores) / 2**20
        limit = sum(s["limit"] for s in stores) / 2**20
        line += (f"; host store {sum(s['entries'] for s in stores)} entries, "
                 f"{used:.0f} of {limit:.0f} MiB, {sum(s['hit_tokens'] for s in stores)} "
                 "tokens restored")
    return line


def _spec_line(counters: dict[str, int]) -> str | None:
    """Speculative decoding since start: draft tokens verified and kept (None: none)."""
    drafted, accepted = counters.get("drafted_tokens", 0), counters.get("accepted_tokens", 0)
    if not drafted:
        return None
    return (f"speculation: {accepted} of {drafted} draft tokens accepted "
            f"({100 * accepted / drafted:.0f}%)")


# ---- llmctl status ----------------------------------------------------------------------

def print_status(st: dict[str, Any], console: Console) -> None:
    gw = st["gateway"]
    console.print(f"[bold]llmctl[/] supervisor pid {st['pid']}, up {uptime(st['uptime_s'])}, "
                  f"model {os.path.basename(st['model'])}")
    if st.get("role") == "node":
        console.print(f"node {st['node']}: no gateway here, workers join the head at "
                      f"{st['join']}", highlight=False)
    else:
        console.print(f"gateway pid {gw['pid']} \\[{gw['state']}] on "
                      f"{', '.join(gw['listening']) or '-'}; queue {gw['queue']}, in flight "
                      f"{gw['inflight']}, connections {gw['connections']}, restarts "
                      f"{gw['restarts']}")
        if st.get("cluster_bind"):
            console.print(f"head {st['node']}: remote workers on {st['cluster_bind']}",
                          highlight=False)
    if gw.get("http_listening"):
        console.print("OpenAI-compatible API on "
                      + ", ".join(f"http://{a}/v1" for a in gw["http_listening"]))
    g = st.get("gpu")
    if g and g.get("enforced"):
        console.print(f"device {g['device']}: VRAM {g['total_mib']:.0f} / "
                      f"{g['budget_mib']:.0f} MiB budget"
                      f"{' [red]OVER BUDGET[/]' if g['breach'] else ''}")
    else:
        console.print("device cpu (no NVIDIA GPU: VRAM budget not enforced)")
    rows = st.get("models") or []
    if rows and rows[0].get("budget_mib"):
        used = sum(m["need_mib"] or 0 for m in rows if m["state"] != "unloaded")
        console.print(f"memory plan ({rows[0]['plan']}): {used:.0f} of {rows[0]['budget_mib']:.0f}"
                      " MiB budget (models loading, loaded or unloading)", highlight=False)
    console.print(_workers_table(st["workers"], several=len(rows) > 1))
    policies = sorted({w["threads"]["policy"] for w in st["workers"] if w.get("threads")})
    if policies:
        console.print(f"compute threads (thr = now/max): {', '.join(policies)} "
                      "([host] threads_policy)", highlight=False, markup=False)
    if len(rows) > 1:
        console.print("models: " + ", ".join(f"{m['name']} {m['state']}" for m in rows),
                      highlight=False)
    if st.get("metrics"):
        _print_metrics(st, console)
    tenants = st.get("tenants") or {}
    if len(tenants) > 1 or any(t["refused"] for t in tenants.values()):
        console.print(_tenants_table(tenants, st.get("scheduling", "fair")))
    for c in [gw, *st["workers"]]:
        if c.get("stderr_tail"):
            console.print(f"[red]{c['id']} last output:[/]")
            for line in c["stderr_tail"]:
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def _tenants_table(tenants: dict[str, dict[str, Any]], policy: str) -> Table:
    """Per tenant: its share, requests open and admitted, tokens, refusals by limit."""
    t = Table(f"tenant ({policy})", "share", "open", "admitted", "tokens", "refused",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, x in tenants.items():
        refused = ", ".join(f"{k} {v}" for k, v in sorted(x["refused"].items())) or "-"
        t.add_row(name, f"{x['share']:g}", str(x["open"]), str(x["admitted"]),
                  str(x["tokens"]), refused)
    return t


def _workers_table(workers: list[dict[str, Any]], several: bool) -> Table:
    """At 80 columns a row fits: busy = in flight / slots, thr = threads now / max."""
    t = Table("worker", *(["model"] if several else []), "node", "pid", "state", "up", "busy",
              "thr", "served", "rst", "RSS", "VRAM", "last exit", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True)
    for w in workers:
        th = w.get("threads")
        t.add_row(w["id"], *([w.get("model", "-")] if several else []), w.get("node", "-"),
                  str(w["pid"] or "-"), state_label(w),
                  "-" if w.get("remote") else uptime(w["uptime_s"]),
                  f"{w['inflight']}/{w.get('slots', '-')}",
                  f"{th['n']}/{th['max']}" if th else "-", str(w.get("served", "-")),
                  str(w["restarts"]), f"{w['rss'] / 2**20:.0f}M" if w.get("rss") else "-",
                  mib(w.get("vram_mib")), w["last_exit"] or "-")
    return t


def _print_metrics(st: dict[str, Any], console: Console) -> None:
    mt, gw = st["metrics"], st["gateway"]
    w = mt["window_s"]
    console.print(f"p50/p95/p99   last {w}s           since start", highlight=False)
    for label, key in (("TTFT", "ttft_ms"), ("latency", "latency_ms")):
        win, tot = mt[key]["window"], mt[key]["total"]
        console.print(f"{label:12}  " + "/".join(ms(win[k]) for k in ("p50", "p95", "p99"))
                      + f" n={win['count']}".ljust(8) + "  "
                      + "/".join(ms(tot[k]) for k in ("p50", "p95", "p99"))
                      + f" n={tot['count']}", highlight=False)
    errs = ", ".join(f"{k} {v}" for k, v in sorted(gw.get("errors", {}).items())) or "none"
    console.print(_cache_line(gw.get("counters", {}), st["workers"]), highlight=False)
    spec = _spec_line(gw.get("counters", {}))
    if spec:
        console.print(spec, highlight=False)
    console.print(f"throughput last {w}s: {mt['requests_per_s']:.2f} req/s, "
                  f"{mt['tokens_per_s']:.1f} tok/s; errors: {errs}", highlight=False)


# ---- llmctl models ----------------------------------------------------------------------

def print_models(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table("model", "file", "load", "state", "workers", "plan", "measured", "last used",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for m in rows:
        name = m["name"] + (" *" if m.get("default") else "")
        t.add_row(name, m["path"].rsplit("/", 1)[-1], m["load"], m["state"],
                  f"{m['workers_ready']}/{len(m['workers'])}", mib(m["need_mib"]),
                  mib(m["measured_mib"]),
                  "never" if m["last_used_s"] is None else f"{m['last_used_s']:.0f}s ago")
    console.print(t)
    if rows:
        r = rows[0]
        budget = f"{r['budget_mib']:.0f} MiB" if r.get("budget_mib") else "none"
        console.print(f"* default model; plan: {r['plan']} estimate, budget {budget}; measured: "
                      f"{'NVML' if r['plan'] == 'vram' else 'RSS'}", highlight=False)
    for m in rows:
        if m.get("error"):
            console.print(f"{m['name']}: {m['error']}", markup=False, highlight=False)


# ---- llmctl top -------------------------------------------------------------------------

def dashboard(st: dict[str, Any]) -> RenderableType:
    mt = st.get("metrics", {})
    gw = st["gateway"]
    g = st.get("gpu") or {}
    models = st.get("models") or []
    several = len(models) > 1
    what = ", ".join(f"{m['name']} {m['state']}" for m in models) if several \
        else os.path.basename(st["model"]).removesuffix(".gguf")
    head = Text.assemble(
        ("llmctl ", "bold"), f"up {uptime(st['uptime_s'])}  ",
        ("models " if several else "model ", "dim"), what, "\n")
    if g.get("enforced"):
        head += Text.assemble(("GPU ", "dim"), f"{g['device']}  VRAM ", _bar(g["total_mib"],
                              g["budget_mib"]), f" {g['total_mib']:.0f}/{g['budget_mib']:.0f} MiB")
    else:
        head += Text.assemble(("device ", "dim"), "CPU", ("  (no NVIDIA GPU: VRAM budget not "
                                                          "enforced)", "dim"))
    workers = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, expand=True)
    for col in ("worker", *(["model"] if several else []), "node", "pid", "state", "slots",
                "tok/s", "RSS", "VRAM", "rst"):
        workers.add_column(col, justify="right" if col not in ("worker", "model", "node", "state")
                           else "left")
    for w in st["workers"]:
        workers.add_row(
            w["id"], *([w.get("model", "-")] if several else []), w.get("node", "-"),
            str(w["pid"] or "-"),
            Text(state_label(w), style=STATE_COLOURS.get(w["state"], "")),
            f"{w['inflight']}/{w.get('slots', '-')}", f"{w.get('tokens_per_s', 0):.1f}",
            f"{w['rss'] / 2**20:.0f}M" if w.get("rss") else "-", mib(w.get("vram_mib")),
            str(w["restarts"]))
    ttft = mt.get("ttft_ms", {}).get("window", {})
    lat = mt.get("latency_ms", {}).get("window", {})
    reqs = Table.grid(padding=(0, 2))
    reqs.add_column(style="dim")
    reqs.add_column()
    reqs.add_column(style="dim")
    reqs.add_column()
    errors = ", ".join(f"{k} {v}" for k, v in sorted(gw.get("errors", {}).items())) or "none"
    reqs.add_row("req/s", f"{mt.get('requests_per_s', 0):.2f}",
                 "tok/s", f"{mt.get('tokens_per_s_10s', 0):.1f}")
    reqs.add_row("queue", f"{gw.get('queue', 0)}", "free credits", f"{st.get('free_credits', 0)}")
    reqs.add_row("TTFT p50/95/99", " / ".join(ms(ttft.get(k)) for k in ("p50", "p95", "p99")),
                 "", "")
    reqs.add_row("latency p50/95/99", " / ".join(ms(lat.get(k)) for k in ("p50", "p95", "p99")),
                 "", "")
    reqs.add_row("errors", Text(errors, overflow="fold"), "", "")
    hist = mt.get("tokens_history", [])
    spark = Text.assemble(("tok/s, last 30 s ", "dim"), (sparkline(hist), "cyan"),
                          f" max {max(hist, default=0)}")
    window = mt.get("window_s", 60)
    return Group(
        Panel(head, box=box.ROUNDED, padding=(0, 1)),
        Panel(workers, title="workers", box=box.ROUNDED, padding=(0, 1)),
        Panel(Group(reqs, spark), title=f"requests (last {window} s)", box=box.ROUNDED,
              padding=(0, 1)),
        Text("q or Ctrl-C quits", style="dim"),
    )


def not_running() -> RenderableType:
    return Panel(Text("llmctl is not running (start it with `llmctl start`)", style="bold red"),
                 title="llmctl top")
