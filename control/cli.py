"""`llmctl`: start | stop | status | restart (the CLI's own output uses print)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from llmctl.common import admin, keys
from llmctl.common import config as config_mod
from llmctl.control import cli_models, gpu
from llmctl.control.models import check_plan, memory_plan, plan_budget
from llmctl.common.config import Config, ConfigError
from llmctl.common.procs import CONFIG_JSON_ENV, make_private, pid_alive

EXIT_NOT_RUNNING = 3
BENCH_PROG_ENV = "LLMCTL_PROG"     # the name `llmctl bench` gives the load generator


class ControlClient:
    """A REQ to the supervisor's control socket, a fresh socket per call."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def call(self, cmd: admin.Command, timeout: float = 2.0) -> dict[str, Any] | None:
        """The supervisor's reply (a JSON object with ``ok``), None if it does not answer."""
        if not (self.cfg.run_dir / "control.sock").exists():
            return None
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.cfg.control_endpoint)
            sock.send(admin.encode(cmd))
            if sock.poll(int(timeout * 1000)):
                return json.loads(sock.recv())
            return None
        finally:
            sock.close(linger=0)


def _supervisor_call(cfg: Config, cmd: admin.Command) -> dict[str, Any] | None:
    return ControlClient(cfg).call(cmd) if _read_pid(cfg) else None


def _read_pid(cfg: Config) -> int | None:
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _port_free(host: str, port: int) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"{host}:{port}: {exc.strerror}"
    return None


def _clean_run_dir(cfg: Config) -> None:
    for name in ("supervisor.pid", "control.sock", "link.sock", "workers.sock", "node.sock"):
        (cfg.run_dir / name).unlink(missing_ok=True)


# ---- start ---------------------------------------------------------------------------

def cmd_start(cfg: Config, args: argparse.Namespace) -> int:
    client = ControlClient(cfg)
    pid = _read_pid(cfg)
    if pid is not None:
        print(f"llmctl is already running (supervisor pid {pid}); nothing changed.")
        return 0
    _clean_run_dir(cfg)
    synthetic = cfg.model.engine == "synthetic"       # no model file, no memory plan
    missing = [] if synthetic else [e for e in cfg.served if not Path(e.path).is_file()]
    if missing:
        what = f"model file not found: {missing[0].path}" if not cfg.models else \
            f"model {missing[0].name}: file not found: {missing[0].path}"
        print(f"error: {what}\n"
              f"  run `make setup` (or python -m llmctl.tools.fetch_model) to fetch the default model",
              file=sys.stderr)
        return 2
    try:
        # [[models]]: the served models' plan (control/models.py); one [model]: as before.
        plan = None if synthetic or cfg.models else gpu.startup_plan(cfg)
        # The served models' plan, when a budget is enforced (reading GGUFs takes seconds).
        if not synthetic and plan_budget(cfg)[0]:
            make_private(cfg.run_dir, cfg.log_dir)      # the plan's figures are kept there
            refused = check_plan(cfg, *memory_plan(cfg))
        else:
            refused = None
    except (gpu.VramBudgetError, gpu.ModelInfoError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    if plan is not None and plan.changes:
        print("the configuration does not fit [gpu] vram_budget_mb; with [gpu] fit = true it "
              "was shrunk:\n  " + "\n  ".join(plan.changes))
        cfg = plan.apply(cfg)
    try:
        _check_keys(cfg)
    except keys.CurveKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    listen = [(cfg.gateway.host, cfg.gateway.port), (cfg.http.host, cfg.http.port)]  # HTTP: /metrics
    if cfg.cluster.bind:
        host, port = cfg.cluster.bind.removeprefix("tcp://").rsplit(":", 1)
        if ":" not in host:                 # an IPv4 address or a name (IPv6: not checked)
            listen.append((host.replace("*", "0.0.0.0"), int(port)))
    busy = [] if cfg.is_node else [        # a node listens on nothing
        e for e in (_port_free(h, p) for h, p in listen) if e]
    if busy:
        print("error: cannot listen on " + "; ".join(busy), file=sys.stderr)
        return 2
    make_private(cfg.run_dir, cfg.log_dir)
    if args.foreground:
        from llmctl.control.supervisor import main as supervisor_main
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s [supervisor] %(name)s: %(message)s")
        return supervisor_main(cfg)

    env = dict(os.environ, **{CONFIG_JSON_ENV: cfg.to_json()})
    out = open(cfg.log_dir / "supervisor.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "llmctl.control.daemon"], env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    out.close()
    deadline = time.monotonic() + cfg.control.start_timeout_s
    status: dict[str, Any] | None = None
    why = f"not ready within {cfg.control.start_timeout_s:.0f}s"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = f"the supervisor exited ({proc.returncode})"
            break
        status = client.call(admin.Status(), timeout=1.0)
        if status and status.get("ok") and cfg.is_node:
            loaded = [w for w in status["workers"] if w["state"] not in ("starting", "backoff",
                                                                         "fatal")]
            if len(loaded) == len(status["workers"]):
                joined = sum(w.get("link") == "joined" for w in loaded)
                print(f"llmctl node {cfg.node_name} started: supervisor pid {proc.pid}, "
                      f"{len(loaded)} worker(s) loaded, {joined} joined the head at "
                      f"{cfg.node.join} (the others join as soon as it answers)")
                return 0
            if all(w["state"] == "fatal" for w in status["workers"]):
                why = "processes failed: " + ", ".join(w["id"] for w in status["workers"])
                break
        elif status and status.get("ok"):
            gw = status["gateway"]
            ready = [w for w in status["workers"] if w["state"] in ("ready", "busy")]
            http_up = gw.get("http_listening") or not cfg.http.enabled
            # Only on-demand models: nothing loads before a request for it.
            lazy = all(m["load"] == "on_demand" for m in status.get("models") or [{}])
            if gw.get("listening") and http_up and (ready or lazy and not status["workers"]):
                print(f"llmctl started: supervisor pid {proc.pid}, gateway "
                      f"{_addresses(gw)}, {len(ready)}/{len(status['workers'])} "
                      f"worker(s) ready")
                return 0
            fatal = [c for c in [gw, *status["workers"]] if c["state"] == "fatal"]
            if gw["state"] == "fatal" or status["workers"] and len(fatal) == len(status["workers"]):
                why = "processes failed: " + ", ".join(c["id"] for c in fatal)
                break
        time.sleep(0.2)
    print(f"error: llmctl did not start: {why}", file=sys.stderr)
    if status:
        for c in [status["gateway"], *status["workers"]]:
            if c.get("stderr_tail") or c["state"] not in ("ready", "busy", "running"):
                print(f"--- {c['id']}: {c['state']} "
                      f"({c.get('last_exit') or 'no exit'}); last output:", file=sys.stderr)
                for line in c.get("stderr_tail", []):
                    print(f"    {line}", file=sys.stderr)
    _tail_file(cfg.log_dir / "supervisor.log", 10)
    _tail_file(cfg.log_dir / "supervisor.out", 10)
    _stop(cfg, proc.pid, quiet=True)
    return 1


def _check_keys(cfg: Config) -> None:
    """Every key file the config names is readable and of the right kind, before start."""
    c, n = cfg.cluster, cfg.node
    if c.bind and c.secret_key:
        keys.load_secret(c.secret_key)
        if not os.path.isdir(c.authorized_keys):
            raise keys.CurveKeyError(f"[cluster] authorized_keys {c.authorized_keys}: not a "
                                     "directory (it holds the nodes' *.key files)")
    if n.join and n.secret_key:
        keys.load_secret(n.secret_key)
        keys.load_public(n.head_key)


def _addresses(gw: dict[str, Any]) -> str:
    """The gateway's TCP addresses, then its HTTP ones (when the HTTP front is on)."""
    tcp = ", ".join(gw.get("listening") or []) or "-"
    http = ", ".join(f"http://{a}" for a in gw.get("http_listening") or [])
    return f"{tcp}, {http}" if http else tcp


def _tail_file(path: Path, n: int) -> None:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return
    print(f"--- {path} (last {len(lines)} lines):", file=sys.stderr)
    for line in lines:
        print(f"    {line}", file=sys.stderr)


# ---- stop ------------------------------------------------------------------------------

def _stop(cfg: Config, pid: int, quiet: bool = False) -> None:
    ControlClient(cfg).call(admin.Stop(), timeout=2.0)
    grace = cfg.control.drain_timeout_s + 2 * cfg.control.stop_timeout_s + 5
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        if not quiet:
            print(f"supervisor {pid} did not stop within {grace:.0f}s: SIGKILL "
                  "(its children die with it)", file=sys.stderr)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        while pid_alive(pid):
            time.sleep(0.05)
    _clean_run_dir(cfg)


def cmd_stop(cfg: Config, args: argparse.Namespace) -> int:
    pid = _read_pid(cfg)
    if pid is None:
        _clean_run_dir(cfg)
        print("llmctl is not running.")
        return 0
    print(f"stopping llmctl (supervisor pid {pid}): draining in-flight requests...")
    _stop(cfg, pid)
    print("llmctl stopped.")
    return 0


# ---- status ----------------------------------------------------------------------------

def _fmt_uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _threads_cell(th: dict[str, Any] | None) -> str:
    return f"{th['n']}/{th['max']}" if th else "-"


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


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    st = ControlClient(cfg).call(admin.Status()) if _read_pid(cfg) else None
    if not st or not st.get("ok"):
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print("llmctl is not running.")
        return EXIT_NOT_RUNNING
    st.pop("ok", None)
    st["running"] = True
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from llmctl.control.top import _ms, state_label

    gw = st["gateway"]
    console = Console()
    console.print(f"[bold]llmctl[/] supervisor pid {st['pid']}, up {_fmt_uptime(st['uptime_s'])}, "
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
        console.print(f"device {g['device']}: VRAM {g['total_mib']:.0f} / {g['budget_mib']:.0f} MiB "
                      f"budget{' [red]OVER BUDGET[/]' if g['breach'] else ''}")
    else:
        console.print("device cpu (no NVIDIA GPU: VRAM budget not enforced)")
    rows = st.get("models") or []
    if rows and rows[0].get("budget_mib"):
        used = sum(m["need_mib"] or 0 for m in rows if m["state"] != "unloaded")
        console.print(f"memory plan ({rows[0]['plan']}): {used:.0f} of {rows[0]['budget_mib']:.0f}"
                      " MiB budget (models loading, loaded or unloading)", highlight=False)
    # Fits 80 columns: busy = in flight / slots.
    several = len(st.get("models") or []) > 1
    t = Table("worker", *(["model"] if several else []), "node", "pid", "state", "up", "busy",
              "thr", "served", "rst", "RSS", "VRAM", "last exit", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True)
    for w in st["workers"]:
        rss = f"{w['rss'] / 2**20:.0f}M" if w.get("rss") else "-"
        vram = f"{w['vram_mib']:.0f}M" if w.get("vram_mib") is not None else "-"
        up = "-" if w.get("remote") else _fmt_uptime(w["uptime_s"])
        t.add_row(w["id"], *([w.get("model", "-")] if several else []), w.get("node", "-"),
                  str(w["pid"] or "-"), state_label(w), up,
                  f"{w['inflight']}/{w.get('slots', '-')}", _threads_cell(w.get("threads")),
                  str(w.get("served", "-")),
                  str(w["restarts"]), rss, vram, w["last_exit"] or "-")
    console.print(t)
    policies = sorted({w["threads"]["policy"] for w in st["workers"] if w.get("threads")})
    if policies:
        console.print(f"compute threads (thr = now/max): {', '.join(policies)} "
                      "([host] threads_policy)", highlight=False, markup=False)
    if several:
        console.print("models: " + ", ".join(f"{m['name']} {m['state']}" for m in st["models"]),
                      highlight=False)
    mt = st.get("metrics") or {}
    if mt:
        w = mt["window_s"]
        console.print(f"p50/p95/p99   last {w}s           since start", highlight=False)
        for label, key in (("TTFT", "ttft_ms"), ("latency", "latency_ms")):
            win, tot = mt[key]["window"], mt[key]["total"]
            console.print(f"{label:12}  " + "/".join(_ms(win[k]) for k in ("p50", "p95", "p99"))
                          + f" n={win['count']}".ljust(8) + "  "
                          + "/".join(_ms(tot[k]) for k in ("p50", "p95", "p99"))
                          + f" n={tot['count']}", highlight=False)
        errs = ", ".join(f"{k} {v}" for k, v in sorted(gw.get("errors", {}).items())) or "none"
        console.print(_cache_line(gw.get("counters", {}), st["workers"]), highlight=False)
        console.print(f"throughput last {w}s: {mt['requests_per_s']:.2f} req/s, "
                      f"{mt['tokens_per_s']:.1f} tok/s; errors: {errs}", highlight=False)
    for c in [gw, *st["workers"]]:
        if c.get("stderr_tail"):
            console.print(f"[red]{c['id']} last output:[/]")
            for line in c["stderr_tail"]:
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_restart(cfg: Config, args: argparse.Namespace) -> int:
    st = ControlClient(cfg).call(admin.Restart(workers=args.workers)) if _read_pid(cfg) else None
    if not st:
        print("llmctl is not running.")
        return EXIT_NOT_RUNNING
    print("restart requested" if st.get("ok") else f"error: {st.get('error')}")
    return 0 if st.get("ok") else 1


def cmd_top(cfg: Config, args: argparse.Namespace) -> int:
    from llmctl.control.top import run

    client = ControlClient(cfg)

    def fetch() -> dict[str, Any] | None:
        st = client.call(admin.Status(), timeout=1.0) if _read_pid(cfg) else None
        return st if st and st.get("ok") else None

    return run(fetch, refresh_s=args.interval)


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.models:
        return cli_models.check_models(cfg)
    try:
        print(gpu.check_main(cfg))
    except gpu.VramBudgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except gpu.ModelInfoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_reload(cfg: Config, args: argparse.Namespace) -> int:
    client = ControlClient(cfg)
    st = client.call(admin.Reload()) if _read_pid(cfg) else None
    if (code := cli_models.refused(st)) is not None:
        return code
    print("changed: " + (", ".join(st["changed"]) or "nothing"))
    if st["not_applied"]:
        print("NOT applied (needs `llmctl stop` and `llmctl start`): "
              + ", ".join(st["not_applied"]))
    print("rolling the workers one at a time...")
    last = ""
    deadline = time.monotonic() + cfg.workers.ready_timeout_s * (cfg.workers.count + 2) \
        + cfg.control.drain_timeout_s * cfg.workers.count
    while time.monotonic() < deadline:
        status = client.call(admin.Status())
        if status is None:
            print("error: the supervisor stopped answering", file=sys.stderr)
            return 1
        r = status["reload"]
        if r.get("step") and r["step"] != last:
            last = r["step"]
            print(f"  {last}")
        if r["state"] == "done":
            print("reload done.")
            return 0
        if r["state"] == "failed":
            print(f"error: reload failed: {r['error']}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print("error: reload did not finish in time", file=sys.stderr)
    return 1


def cmd_logs(cfg: Config, args: argparse.Namespace) -> int:
    path = cfg.log_dir / f"{args.name}.log"
    if not path.exists():
        names = sorted(p.stem for p in cfg.log_dir.glob("*.log"))
        print(f"no log {path}; available: {', '.join(names) or 'none'}", file=sys.stderr)
        return 1
    lines = path.read_text(errors="replace").splitlines()[-args.lines:]
    for line in lines:
        print(line)
    if not args.follow:
        return 0
    f = path.open("rb")
    f.seek(0, os.SEEK_END)
    ino = os.fstat(f.fileno()).st_ino
    try:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
                continue
            try:
                if os.stat(path).st_ino != ino:      # rotated: follow the new file
                    f.close()
                    f = path.open("rb")
                    ino = os.fstat(f.fileno()).st_ino
                    continue
            except FileNotFoundError:
                pass
            time.sleep(0.25)
    except KeyboardInterrupt:
        return 0
    finally:
        f.close()


def cmd_keys(cfg: Config | None, args: argparse.Namespace) -> int:
    """`llmctl keys generate NAME` / `llmctl keys fingerprint FILE...` (no config needed)."""
    try:
        if args.action == "generate":
            public, secret = keys.generate(Path(args.dir), args.name)
            fp = keys.fingerprint(keys.load_public(public))
            print(f"wrote {public} (public, copy it where it is trusted)\n"
                  f"wrote {secret} (secret, mode 0600, never leaves this machine)\n"
                  f"fingerprint {fp}")
            return 0
        for f in args.files:
            print(f"{keys.fingerprint(keys.load_public(f))}  {f}")
        return 0
    except keys.CurveKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmctl", description="supervised LLM inference service")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None,
                        help=f"config file (default ${config_mod.CONFIG_ENV} or ./config.toml)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", parents=[common], help="start the service in the background")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("stop", parents=[common], help="drain and stop the service")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("status", parents=[common], help="show processes and their state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("restart", parents=[common], help="clear FATAL workers and restart them")
    p.add_argument("workers", nargs="*")
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser("top", parents=[common], help="live dashboard (q or Ctrl-C quits)")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds")
    p.set_defaults(func=cmd_top)
    sub.add_parser("bench", help="load generator (llmctl bench --help)", add_help=False)
    p = sub.add_parser("check", parents=[common],
                       help="print the GPU memory plan (estimate vs budget); starts nothing")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("reload", parents=[common],
                       help="re-read the config and roll the workers one at a time")
    p.set_defaults(func=cmd_reload)
    cli_models.add_parsers(sub, common, _supervisor_call)
    p = sub.add_parser("logs", parents=[common], help="show a process's log")
    p.add_argument("name", nargs="?", default="supervisor",
                   help="supervisor, gateway, w0, w1, ... (default supervisor)")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("keys", help="CURVE keypairs of a cluster (docs/cluster.md)")
    ks = p.add_subparsers(dest="action", required=True)
    k = ks.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (0600)")
    k.add_argument("name", help="head, or the node's name")
    k.add_argument("--dir", default="keys", help="directory to write into (default keys/)")
    k = ks.add_parser("fingerprint", help="the fingerprint of public key files, as logs show it")
    k.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_keys, config_free=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:       # a client of any server: no config needed
        os.environ[BENCH_PROG_ENV] = "llmctl bench"
        os.execv(sys.executable, [sys.executable, "-m", "llmctl.tools.bench", *argv[1:]])
    args = build_parser().parse_args(argv)
    if getattr(args, "config_free", False):
        return args.func(None, args)
    path = Path(args.config) if args.config else config_mod.default_path()
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return args.func(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
