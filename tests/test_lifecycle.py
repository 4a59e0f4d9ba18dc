"""``llmctl start``, ``status`` and ``stop`` on the real model: the processes they start and
end, no orphans when the supervisor is killed, and a start that fails says why."""
from __future__ import annotations

import os
import signal

import pytest

from tests.service import pid_gone, port_is_free, wait_until

pytestmark = pytest.mark.integration


def test_start_status_stop_lifecycle(make_service):
    s = make_service()
    r = s.start()
    assert r.returncode == 0, r.stderr
    assert "started" in r.stdout
    again = s.llmctl("start")
    assert again.returncode == 0 and "already running" in again.stdout

    st = s.status()
    assert st["exit_code"] == 0 and st["running"] is True
    pids = [st["pid"], st["gateway"]["pid"], *(w["pid"] for w in st["workers"])]
    assert all(isinstance(x, int) and not pid_gone(x) for x in pids)
    assert st["gateway"]["listening"] == [f"127.0.0.1:{s.port}"]
    [w] = st["workers"]
    assert w["id"] == "w0" and w["state"] == "ready" and w["inflight"] == 0
    assert w["restarts"] == 0
    table = s.llmctl("status")
    assert table.returncode == 0 and "w0" in table.stdout and str(w["pid"]) in table.stdout

    r = s.llmctl("stop")
    assert r.returncode == 0 and "stopped" in r.stdout
    for pid in pids:
        assert pid_gone(pid), f"pid {pid} still alive after stop"
    assert port_is_free(s.port)
    assert not (s.dir / "run" / "supervisor.pid").exists()
    assert not (s.dir / "run" / "control.sock").exists()
    assert s.llmctl("status").returncode == 3
    again = s.llmctl("stop")
    assert again.returncode == 0 and "not running" in again.stdout


def test_no_orphans_when_supervisor_is_killed(make_service):
    s = make_service()
    assert s.start().returncode == 0
    st = s.status()
    children = [st["gateway"]["pid"], *(w["pid"] for w in st["workers"])]
    os.kill(st["pid"], signal.SIGKILL)
    wait_until(lambda: all(pid_gone(x) for x in children), 5.0, "children to exit")


def test_start_fails_clearly_when_the_model_does_not_load(make_service, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    s = make_service(model={"path": str(bad)},
                     control={"backoff_initial_s": 0.05, "backoff_max_s": 0.1, "max_restarts": 1,
                              "start_timeout_s": 60.0})
    r = s.start()
    assert r.returncode != 0
    assert "did not start" in r.stderr
    assert "w0" in r.stderr and "cannot load model" in r.stderr   # the worker's own stderr
    assert s.llmctl("status").returncode == 3                       # cleaned up
    assert port_is_free(s.port)
