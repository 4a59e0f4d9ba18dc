"""`llmctl top`: a live dashboard of the service (rich Live, 80x24, q or Ctrl-C quits).

``render(status)`` is a pure function of one ``llmctl status --json`` snapshot, so
it can be tested by rendering to text; ``run()`` polls the control socket once a
second and redraws.
"""
from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from typing import Any, Callable

from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SPARK = " ▁▂▃▄▅▆▇█"


def _uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f}s" if v >= 1000 else f"{v:.0f}ms"


def _bar(used: float, total: float, width: int = 20) -> Text:
    frac = 0.0 if total <= 0 else min(1.0, used / total)
    n = round(frac * width)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.7 else "green"
    return Text("█" * n, style=style) + Text("░" * (width - n), style="dim")


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


def render(st: dict[str, Any]) -> RenderableType:
    mt = st.get("metrics", {})
    gw = st["gateway"]
    g = st.get("gpu") or {}
    models = st.get("models") or []
    several = len(models) > 1
    what = ", ".join(f"{m['name']} {m['state']}" for m in models) if several \
        else os.path.basename(st["model"]).removesuffix(".gguf")
    head = Text.assemble(
        ("llmctl ", "bold"), f"up {_uptime(st['uptime_s'])}  ",
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
    colors = {"ready": "green", "busy": "yellow", "fatal": "bold red", "backoff": "red",
              "starting": "cyan", "draining": "magenta"}
    for w in st["workers"]:
        workers.add_row(
            w["id"], *([w.get("model", "-")] if several else []), w.get("node", "-"),
            str(w["pid"] or "-"),
            Text(state_label(w), style=colors.get(w["state"], "")),
            f"{w['inflight']}/{w.get('slots', '-')}", f"{w.get('tokens_per_s', 0):.1f}",
            f"{w['rss'] / 2**20:.0f}M" if w.get("rss") else "-",
            f"{w['vram_mib']:.0f}M" if w.get("vram_mib") is not None else "-",
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
    reqs.add_row("TTFT p50/95/99", " / ".join(_ms(ttft.get(k)) for k in ("p50", "p95", "p99")),
                 "", "")
    reqs.add_row("latency p50/95/99", " / ".join(_ms(lat.get(k)) for k in ("p50", "p95", "p99")),
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


def run(fetch: Callable[[], dict[str, Any] | None], refresh_s: float = 1.0) -> int:
    """Redraw every ``refresh_s`` until q or Ctrl-C."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    old = termios.tcgetattr(fd) if fd is not None else None
    try:
        if fd is not None:
            tty.setcbreak(fd)
        with Live(not_running(), auto_refresh=False, screen=False) as live:
            while True:
                st = fetch()
                live.update(render(st) if st else not_running(), refresh=True)
                deadline = time.monotonic() + refresh_s
                while (left := deadline - time.monotonic()) > 0:
                    if fd is None:
                        time.sleep(left)
                        break
                    ready, _, _ = select.select([fd], [], [], left)
                    if ready and os.read(fd, 32).lower().startswith(b"q"):
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if fd is not None and old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
