"""The CLI's side of the supervisor: is one running, ask it, stop it.

``call`` is the one way a command asks the running supervisor: a REQ on its control
socket (``run_dir/control.sock``), a fresh socket per call, answered with a JSON object
that carries ``ok``; None when no supervisor runs or it does not answer in time.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import zmq

from llmctl.common import admin
from llmctl.common.config import Config
from llmctl.common.procs import pid_alive
from llmctl.control.supervisor import run_files

EXIT_NOT_RUNNING = 3


def read_pid(cfg: Config) -> int | None:
    """The running supervisor's pid (None: its pidfile is missing or names no process)."""
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def call(cfg: Config, cmd: admin.Command, timeout: float = 2.0) -> dict[str, Any] | None:
    """The running supervisor's reply to ``cmd``; None if none runs or it does not answer."""
    if read_pid(cfg) is None or not (cfg.run_dir / "control.sock").exists():
        return None
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(cfg.control_endpoint)
        sock.send(admin.encode(cmd))
        if sock.poll(int(timeout * 1000)):
            return json.loads(sock.recv())
        return None
    finally:
        sock.close(linger=0)


def clean_run_dir(cfg: Config) -> None:
    """Remove what a supervisor that is gone left in run_dir (its pidfile, sockets)."""
    for path in run_files(cfg):
        path.unlink(missing_ok=True)


def stop(cfg: Config, pid: int, quiet: bool = False) -> None:
    """Ask the supervisor ``pid`` to drain and stop; SIGKILL it if it does not in time."""
    call(cfg, admin.Stop())
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
    clean_run_dir(cfg)


def refused(st: dict[str, Any] | None) -> int | None:
    """The supervisor's answer to a command: None when it took it, else the exit code,
    the reason said (not running, or its error)."""
    if not st:
        print("llmctl is not running.")
        return EXIT_NOT_RUNNING
    if not st.get("ok"):
        print(f"error: {st.get('error')}", file=sys.stderr)
        return 1
    return None
