"""`llmctl start`: check what the config needs, start the supervisor, wait until it serves.

The steps, in order; a check that fails raises ``StartRefused`` and nothing starts:

1. ``check_model_files``: every served model's file exists (none for the synthetic engine);
2. ``fit_memory``: the memory plan: the served models fit their budget, or one ``[model]``
   is shrunk to ``[gpu] vram_budget_mb`` (``fit = true``); the config to start;
3. ``check_keys``: every CURVE key file the config names is readable and of its kind;
4. ``check_ports``: the head's listeners are free (a node listens on nothing);
5. ``spawn`` the supervisor's daemon (or run it here with ``--foreground``);
6. ``wait_started``: its status, until ``verdict`` says it serves or failed; a failure
   shows what each process said and stops what started.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from llmctl.common import admin, keys
from llmctl.common.config import Config
from llmctl.common.procs import CONFIG_JSON_ENV, make_private
from llmctl.control import gpu
from llmctl.control.models import check_plan, memory_plan, plan_budget
from llmctl.control.supervisor import main as supervisor_main
from llmctl.control.supervisor_client import call, clean_run_dir, read_pid, stop


class StartRefused(Exception):
    """The config cannot start on this machine: why, as the user reads it."""


class Verdict(NamedTuple):
    started: str = ""          # the line that says so
    failed: str = ""           # why


def cmd_start(cfg: Config, args: argparse.Namespace) -> int:
    pid = read_pid(cfg)
    if pid is not None:
        print(f"llmctl is already running (supervisor pid {pid}); nothing changed.")
        return 0
    clean_run_dir(cfg)
    try:
        check_model_files(cfg)
        cfg = fit_memory(cfg)
        check_keys(cfg)
        check_ports(cfg)
    except StartRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    make_private(cfg.run_dir, cfg.log_dir)
    if args.foreground:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s [supervisor] %(name)s: %(message)s")
        return supervisor_main(cfg)
    return wait_started(cfg, spawn(cfg))


def check_model_files(cfg: Config) -> None:
    if cfg.model.engine == "synthetic":
        return
    missing = [e for e in cfg.served if not Path(e.path).is_file()]
    if missing:
        what = f"model file not found: {missing[0].path}" if not cfg.models else \
            f"model {missing[0].name}: file not found: {missing[0].path}"
        raise StartRefused(f"{what}\n  run `make setup` (or python -m llmctl.tools.fetch_model)"
                           " to fetch the default model")


def fit_memory(cfg: Config) -> Config:
    """The config to start.  ``[[models]]``: the served models' plan, when a budget is
    enforced (control/models.py; reading the GGUFs takes seconds); one ``[model]``: the
    VRAM plan of control/gpu.py, which may shrink it (said on stdout)."""
    if cfg.model.engine == "synthetic":        # no model file, no memory plan
        return cfg
    try:
        plan = None if cfg.models else gpu.startup_plan(cfg)
        refused = None
        if plan_budget(cfg)[0]:
            make_private(cfg.run_dir, cfg.log_dir)      # the plan's figures are kept there
            refused = check_plan(cfg, *memory_plan(cfg))
    except (gpu.VramBudgetError, gpu.ModelInfoError) as exc:
        raise StartRefused(str(exc)) from None
    if refused:
        raise StartRefused(refused)
    if plan is not None and plan.changes:
        print("the configuration does not fit [gpu] vram_budget_mb; with [gpu] fit = true it "
              "was shrunk:\n  " + "\n  ".join(plan.changes))
        return plan.apply(cfg)
    return cfg


def check_keys(cfg: Config) -> None:
    """Every key file the config names is readable and of the right kind."""
    c, n = cfg.cluster, cfg.node
    try:
        if c.bind and c.secret_key:
            keys.load_secret(c.secret_key)
            if not os.path.isdir(c.authorized_keys):
                raise keys.CurveKeyError(f"[cluster] authorized_keys {c.authorized_keys}: not "
                                         "a directory (it holds the nodes' *.key files)")
        if n.join and n.secret_key:
            keys.load_secret(n.secret_key)
            keys.load_public(n.head_key)
    except keys.CurveKeyError as exc:
        raise StartRefused(str(exc)) from None


def listen_addresses(cfg: Config) -> list[tuple[str, int]]:
    """Where a head listens: the gateway, HTTP (/metrics at least) and the cluster's bind
    (an IPv4 address or a name; IPv6 is not checked).  A node listens on nothing."""
    if cfg.is_node:
        return []
    out = [(cfg.gateway.host, cfg.gateway.port), (cfg.http.host, cfg.http.port)]
    if cfg.cluster.bind:
        host, port = cfg.cluster.bind.removeprefix("tcp://").rsplit(":", 1)
        if ":" not in host:
            out.append((host.replace("*", "0.0.0.0"), int(port)))
    return out


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None: it can)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"{host}:{port}: {exc.strerror}"
    return None


def check_ports(cfg: Config) -> None:
    busy = [e for e in (port_taken(h, p) for h, p in listen_addresses(cfg)) if e]
    if busy:
        raise StartRefused("cannot listen on " + "; ".join(busy))


def spawn(cfg: Config) -> subprocess.Popen:
    """The supervisor's daemon (control/daemon.py), in a session of its own; its raw
    output goes to ``supervisor.out``."""
    env = dict(os.environ, **{CONFIG_JSON_ENV: cfg.to_json()})
    with open(cfg.log_dir / "supervisor.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "llmctl.control.daemon"], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)


def verdict(cfg: Config, st: dict[str, Any] | None, pid: int) -> Verdict:
    """What one status reply says of a start (an empty ``Verdict``: not yet)."""
    if not st or not st.get("ok"):
        return Verdict()
    workers = st["workers"]
    if cfg.is_node:
        loaded = [w for w in workers if w["state"] not in ("starting", "backoff", "fatal")]
        if len(loaded) == len(workers):
            joined = sum(w.get("link") == "joined" for w in loaded)
            return Verdict(started=(
                f"llmctl node {cfg.node_name} started: supervisor pid {pid}, {len(loaded)} "
                f"worker(s) loaded, {joined} joined the head at {cfg.node.join} (the others "
                "join as soon as it answers)"))
        if all(w["state"] == "fatal" for w in workers):
            return Verdict(failed="processes failed: " + ", ".join(w["id"] for w in workers))
        return Verdict()
    gw = st["gateway"]
    ready = [w for w in workers if w["state"] in ("ready", "busy")]
    http_up = gw.get("http_listening") or not cfg.http.enabled
    # Only on-demand models: nothing loads before a request for it.
    lazy = all(m["load"] == "on_demand" for m in st.get("models") or [{}])
    if gw.get("listening") and http_up and (ready or lazy and not workers):
        return Verdict(started=f"llmctl started: supervisor pid {pid}, gateway "
                               f"{_addresses(gw)}, {len(ready)}/{len(workers)} worker(s) ready")
    fatal = [c for c in [gw, *workers] if c["state"] == "fatal"]
    if gw["state"] == "fatal" or workers and len(fatal) == len(workers):
        return Verdict(failed="processes failed: " + ", ".join(c["id"] for c in fatal))
    return Verdict()


def wait_started(cfg: Config, proc: subprocess.Popen) -> int:
    """Poll the new supervisor's status until ``verdict`` decides or the start times out;
    on failure, say why and stop it."""
    deadline = time.monotonic() + cfg.control.start_timeout_s
    st: dict[str, Any] | None = None
    why = f"not ready within {cfg.control.start_timeout_s:.0f}s"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = f"the supervisor exited ({proc.returncode})"
            break
        st = call(cfg, admin.Status(), timeout=1.0)
        v = verdict(cfg, st, proc.pid)
        if v.started:
            print(v.started)
            return 0
        if v.failed:
            why = v.failed
            break
        time.sleep(0.2)
    print(f"error: llmctl did not start: {why}", file=sys.stderr)
    if st and st.get("ok"):
        for c in [st["gateway"], *st["workers"]]:
            if c.get("stderr_tail") or c["state"] not in ("ready", "busy", "running"):
                print(f"--- {c['id']}: {c['state']} "
                      f"({c.get('last_exit') or 'no exit'}); last output:", file=sys.stderr)
                for line in c.get("stderr_tail", []):
                    print(f"    {line}", file=sys.stderr)
    _tail_file(cfg.log_dir / "supervisor.log", 10)
    _tail_file(cfg.log_dir / "supervisor.out", 10)
    stop(cfg, proc.pid, quiet=True)
    return 1


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
