"""Process plumbing shared by the supervisor and its children.

* ``terminate(proc, timeout)``: the one way a process is stopped (SIGTERM, wait,
  SIGKILL).
* ``die_with_parent()``: run in the child between fork and exec; the kernel sends it
  SIGKILL when the supervisor dies, however it dies (no orphans).
* ``setup_child_logging``: children log to stderr; the supervisor captures it into
  ``run_dir/logs/NAME.log`` and keeps its tail for ``llmctl status``.
* ``thread_times(pid)``: each thread's CPU time and run-queue wait (the scheduler's
  ``/proc/PID/task/TID/schedstat``), read by a worker about itself and by the
  busy-neighbour benchmark about the servers it measures.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_JSON_ENV = "LLMCTL_RESOLVED_CONFIG"
# A child's exit status when it refuses its configuration (sysexits' EX_CONFIG): starting
# it again cannot help, so the supervisor does not.
EXIT_CONFIG = 78
_PR_SET_PDEATHSIG = 1


def make_private(run_dir: Path, log_dir: Path) -> None:
    """The run directory 0700, its logs 0600, whatever the umask; and umask 077 for this
    process and its children, so the sockets, pidfile and logs they create later are
    private too (logs hold request details)."""
    os.umask(0o077)
    for d in (run_dir, log_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.chmod(0o700)
    for p in [*run_dir.iterdir(), *log_dir.iterdir()]:
        if p.is_file() or p.is_socket():
            p.chmod(0o600)


def bind_private(sock: Any, endpoint: str) -> None:
    """Bind a ZeroMQ socket; an ipc:// endpoint's file is made 0600 (owner only)."""
    sock.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)


def die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when its parent exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the children's own parent watch still applies


def setup_child_logging(name: str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")


def terminate_popen(proc: Any, timeout: float) -> int:
    """``terminate`` for a ``subprocess.Popen`` (tools and tests outside an event loop):
    SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.  Returns the exit code."""
    import subprocess

    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.1fs: SIGKILL", proc.pid, timeout)
        proc.kill()
        return proc.wait()


async def terminate(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.  Returns the exit code."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        # A stopped process cannot act on SIGTERM until it runs again.
        proc.send_signal(signal.SIGCONT)
    except ProcessLookupError:
        pass
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        log.warning("pid %d ignored SIGTERM for %.1fs: SIGKILL", proc.pid, timeout)
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        return await proc.wait()


def thread_times(pid: int | str = "self", names: bool = False) -> dict[int, tuple[str, int, int, int]]:
    """Per thread of ``pid``: (name, ns on a CPU, ns runnable but waiting for one, time
    slices), from ``/proc/PID/task/*/schedstat``; names only when asked (one more read
    per thread).  Threads that end while being read are left out."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                run, wait, slices = f.read().split()[:3]
            name = ""
            if names:
                with open(f"{base}/{tid}/comm") as f:
                    name = f.read().strip()
        except OSError:
            continue
        out[int(tid)] = (name, int(run), int(wait), int(slices))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_CONFIG:
        return f"exit code {code}: its configuration was refused"
    return f"exit code {code}"
