"""`llmctl`: the command line (its own output uses print).

The subcommands: ``start`` (start.py), ``stop``, ``status``, ``restart``, ``top``
(top.py), ``bench`` (the load generator, tools/bench.py), ``check``, ``reload``,
``models``, ``load`` and ``unload`` (cli_models.py), ``logs`` and ``keys``.  Each asks
the running supervisor through ``supervisor_client.call``; tables are drawn by
render.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmctl.common import admin, keys
from llmctl.common import config as config_mod
from llmctl.common.config import Config, ConfigError
from llmctl.common.console import console
from llmctl.control import cli_models, gpu, render, supervisor_client
from llmctl.control.start import cmd_start
from llmctl.control.supervisor_client import EXIT_NOT_RUNNING, call, read_pid, refused

BENCH_PROG_ENV = "LLMCTL_PROG"     # the name `llmctl bench` gives the load generator


def cmd_stop(cfg: Config, args: argparse.Namespace) -> int:
    pid = read_pid(cfg)
    if pid is None:
        supervisor_client.clean_run_dir(cfg)
        print("llmctl is not running.")
        return 0
    print(f"stopping llmctl (supervisor pid {pid}): draining in-flight requests...")
    supervisor_client.stop(cfg, pid)
    print("llmctl stopped.")
    return 0


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    st = call(cfg, admin.Status())
    if not st or not st.get("ok"):
        print(json.dumps({"running": False}) if args.json else "llmctl is not running.")
        return EXIT_NOT_RUNNING
    st.pop("ok", None)
    st["running"] = True
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        render.print_status(st, console())
    return 0


def cmd_restart(cfg: Config, args: argparse.Namespace) -> int:
    st = call(cfg, admin.Restart(workers=args.workers))
    if not st:
        print("llmctl is not running.")
        return EXIT_NOT_RUNNING
    print("restart requested" if st.get("ok") else f"error: {st.get('error')}")
    return 0 if st.get("ok") else 1


def cmd_top(cfg: Config, args: argparse.Namespace) -> int:
    from llmctl.control.top import run

    def fetch() -> dict[str, Any] | None:
        st = call(cfg, admin.Status(), timeout=1.0)
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
    st = call(cfg, admin.Reload())
    if (code := refused(st)) is not None:
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
        status = call(cfg, admin.Status())
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
    cli_models.add_parsers(sub, common)
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
