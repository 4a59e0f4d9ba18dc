"""The restart policy of a supervised process (control/child.py), as pure state."""
from __future__ import annotations

import time
import types

from msgspec.structs import replace

from llmctl.control.child import ChildProcess
from llmctl.control.states import ProcessState
from llmctl.common.config import Config
from llmctl.common.procs import EXIT_CONFIG


def child(tmp_path, **control) -> ChildProcess:
    cfg = Config()
    cfg = replace(cfg, control=replace(cfg.control, run_dir=str(tmp_path), **control))
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    return ChildProcess("w0", cfg)


def crash(c: ChildProcess, ready: bool, code: int = -9) -> bool:
    """A spawn that dies at once (after READY if ``ready``); True if it was noticed."""
    c.proc = types.SimpleNamespace(returncode=code, pid=1)
    c.to(ProcessState.RUNNING)              # a spawn (the gateway's kind: running at once)
    c.was_ready = False
    c._started_mono = time.monotonic()       # it had just started
    if ready:
        c.mark_ready()
    return c.exited()


def test_a_process_that_had_been_ready_is_restarted_forever_with_capped_backoff(tmp_path):
    c = child(tmp_path, max_restarts=2, restart_window_s=3600.0, backoff_initial_s=0.5,
              backoff_max_s=8.0)
    delays = []
    for _ in range(50):
        assert crash(c, ready=True)
        assert c.state == "backoff"
        delays.append(c.backoff_s)
    assert delays[:5] == [0.5, 1.0, 2.0, 4.0, 8.0] and set(delays[4:]) == {8.0}
    snap = c.snapshot()
    assert snap["state"] == "backoff" and snap["backoff_s"] == 8.0 and snap["restart_in_s"] > 0


def test_only_failures_before_ready_make_a_process_fatal(tmp_path):
    c = child(tmp_path, max_restarts=2, restart_window_s=3600.0)
    for _ in range(2):
        assert crash(c, ready=False) and c.state == "backoff"
    assert crash(c, ready=True) and c.state == "backoff"   # it loaded once: history forgotten
    for _ in range(2):
        assert crash(c, ready=False) and c.state == "backoff"
    assert crash(c, ready=False) and c.state == "fatal"     # the third load failure in a row
    c.reset()                                               # `llmctl restart`
    assert c.state == "backoff" and not c.crashes


def test_a_process_that_refuses_its_configuration_is_fatal_at_once(tmp_path):
    c = child(tmp_path, max_restarts=5, restart_window_s=3600.0)
    assert crash(c, ready=False, code=EXIT_CONFIG) and c.state == "fatal"
    assert "configuration was refused" in c.snapshot()["last_exit"]
    c.reset()
    assert crash(c, ready=True, code=EXIT_CONFIG) and c.state == "backoff"   # it had served
