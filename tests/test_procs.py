"""common/procs.py: stopping a child process, politely then for good."""
from __future__ import annotations

import signal
import subprocess
import sys

from llmctl.common.procs import terminate_popen


def test_a_process_that_obeys_sigterm_ends_with_it():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert terminate_popen(proc, 10) == -signal.SIGTERM


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout():
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    assert terminate_popen(proc, 0.5) == -signal.SIGKILL
    proc.stdout.close()


def test_an_ended_process_gives_its_exit_code():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    assert terminate_popen(proc, 1) == 3
