"""Process plumbing shared by the supervisor and its children.

* ``terminate(proc, timeout)``: the one way a process is stopped (SIGTERM, wait,
  SIGKILL).
* ``die_with_parent()``: run in the child between fork and exec; the kernel sends it
  SIGKILL when the supervisor dies, however it dies (no orphans).
* ``setup_child_logging``: children log to stderr; the supervisor captures it into
  ``run_dir/logs/NAME.log`` and keeps its tail for ``llmctl status``.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

CONFIG_JSON_ENV = "LLMCTL_RESOLVED_CONFIG"
_PR_SET_PDEATHSIG = 1


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
    return f"exit code {code}"
