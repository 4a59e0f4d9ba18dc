"""The command line without a real service: its tables written to a pipe are whole (the
real commands, run against a stand-in supervisor), and the steps of `llmctl start`."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import msgspec
import pytest
import zmq

from llmctl.common import admin, config
from llmctl.common.config import Config
from llmctl.common.console import PIPE_WIDTH, console
from llmctl.control import start, supervisor_client
from llmctl.control.render import print_models, print_status
from tests.service import ROOT

NARROW = {**os.environ, "COLUMNS": "80"}      # rich's width where there is no terminal


def worker(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": f"w{i}", "model": "chat-assistant-large" if i else "code", "node": "gpu-node-1",
            "pid": 123450 + i, "state": "ready", "uptime_s": 4000.0 + i, "inflight": 3,
            "slots": 16, "threads": {"n": 8, "max": 16, "policy": "adaptive"}, "served": 987654,
            "restarts": 12, "rss": 1234 * 2**20, "vram_mib": 20480.0,
            "last_exit": "killed by SIGKILL", "stderr_tail": [], **kw}


def model_row(name: str, default: bool = False) -> dict[str, Any]:
    return {"name": name, "path": f"/srv/models/{name}-Instruct-v0.3.Q4_K_M.gguf",
            "load": "on_demand", "state": "loaded", "workers": ["w0", "w1"], "workers_ready": 2,
            "need_mib": 18500.0, "measured_mib": 17321.4, "plan": "vram", "budget_mib": 40000.0,
            "last_used_s": 12.0, "error": "", "default": default}


def snapshot() -> dict[str, Any]:
    """A status as `llmctl status --json` prints it, with lines longer than 80 columns."""
    window = {"p50": 1234.0, "p95": 2345.0, "p99": 3456.0, "count": 99999}
    return {
        "pid": 4242, "uptime_s": 90061.0, "model": "/srv/models/code.gguf", "role": "head",
        "node": "head-1", "cluster_bind": "tcp://10.0.0.1:5555",
        "gateway": {"id": "gateway", "pid": 4243, "state": "running", "restarts": 3,
                    "listening": ["127.0.0.1:8080", "10.0.0.1:8080"],
                    "http_listening": ["127.0.0.1:8081"], "queue": 1234, "inflight": 4321,
                    "connections": 56789, "counters": {"prompt_tokens": 1000,
                                                       "cache_hit_tokens": 250},
                    "errors": {"overloaded": 12, "timeout": 3}, "stderr_tail": []},
        "gpu": None,
        "models": [model_row("code", default=True), model_row("chat-assistant-large")],
        "workers": [worker(0), worker(1, state="backoff", restart_in_s=1.5,
                                      stderr_tail=["x" * 150 + " the end"])],
        "metrics": {"window_s": 60, "requests_per_s": 12.5, "tokens_per_s": 345.6,
                    "ttft_ms": {"window": window, "total": window},
                    "latency_ms": {"window": window, "total": window}},
    }


def in_order(line: str, cells: list[str]) -> bool:
    at = 0
    for cell in cells:
        at = line.find(cell, at)
        if at < 0:
            return False
        at += len(cell)
    return True


def the_line(out: str, start: str, having: str = "") -> str:
    [line] = [x for x in out.splitlines() if x.lstrip().startswith(start) and having in x]
    return line


def assert_status_whole(out: str) -> None:
    assert "…" not in out
    assert in_order(the_line(out, "gateway pid"), ["4243", "on 127.0.0.1:8080, 10.0.0.1:8080",
                                                   "connections 56789", "restarts 3"])
    assert in_order(the_line(out, "worker"), ["worker", "model", "node", "pid", "state", "up",
                                              "busy", "thr", "served", "rst", "RSS", "VRAM",
                                              "last exit"])
    for w, state in (("w0", "ready"), ("w1", "backoff 1.5s")):
        assert in_order(the_line(out, w + " ", "gpu-node-1"), [w, "gpu-node-1", state, "3/16", "8/16",
                                                 "987654", "12", "1234M", "20480M",
                                                 "killed by SIGKILL"])
    assert the_line(out, "x" * 150) == "  " + "x" * 150 + " the end"
    assert in_order(the_line(out, "throughput"), ["12.50 req/s", "errors: overloaded 12, "
                                                  "timeout 3"])


def assert_models_whole(out: str) -> None:
    assert "…" not in out
    for name in ("code *", "chat-assistant-large"):
        file = f"{name.split()[0]}-Instruct-v0.3.Q4_K_M.gguf"
        assert in_order(the_line(out, name), [name, file, "on_demand", "loaded", "2/2",
                                              "18500M", "17321M", "12s ago"])


# ---- rendering ---------------------------------------------------------------------------------

class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_whole_lines_and_a_terminal_its_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert console(file=io.StringIO()).width == PIPE_WIDTH
    assert console(file=Tty()).width == 100


def test_status_and_models_render_whole_to_a_pipe():
    out = io.StringIO()
    print_status(snapshot(), console(file=out))
    assert_status_whole(out.getvalue())
    out = io.StringIO()
    print_models(snapshot()["models"], console(file=out))
    assert_models_whole(out.getvalue())


def test_status_shows_speculation_only_when_it_drafted():
    out = io.StringIO()
    print_status(snapshot(), console(file=out))
    assert "speculation" not in out.getvalue()
    st = snapshot()
    st["gateway"]["counters"].update(drafted_tokens=400, accepted_tokens=300)
    out = io.StringIO()
    print_status(st, console(file=out))
    assert the_line(out.getvalue(), "speculation") == \
        "speculation: 300 of 400 draft tokens accepted (75%)"


# ---- the commands, to a pipe, against a stand-in supervisor ----------------------------------

@contextlib.contextmanager
def stand_in(replies: dict[str, dict[str, Any]]) -> Iterator[Path]:
    """A config whose supervisor is this process: its pid in the pidfile, and a control
    socket that answers each command kind with ``replies[kind]``."""
    d = Path(tempfile.mkdtemp(prefix="llmctl-"))    # ipc:// paths must stay short
    path = d / "c.toml"
    path.write_text('[control]\nrun_dir = "run"\n')
    cfg = config.load(path)
    cfg.run_dir.mkdir()
    cfg.pidfile.write_text(f"{os.getpid()}\n")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(cfg.control_endpoint)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            if sock.poll(50):
                cmd = admin.decode_command(sock.recv())
                sock.send(admin.reply_json(True, **replies[type(cmd).__name__]))

    t = threading.Thread(target=serve)
    t.start()
    try:
        yield path
    finally:
        done.set()
        t.join()
        sock.close(linger=0)
        ctx.term()
        shutil.rmtree(d, ignore_errors=True)


def llmctl(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "llmctl.control", *args], capture_output=True,
                       text=True, cwd=ROOT, env=NARROW, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_status_and_models_commands_print_whole_lines_to_a_pipe():
    st = snapshot()
    with stand_in({"Status": st, "Models": {"models": st["models"]}}) as path:
        assert_status_whole(llmctl("status", "-c", str(path)).stdout)
        assert_models_whole(llmctl("models", "-c", str(path)).stdout)
        assert json.loads(llmctl("status", "--json", "-c", str(path)).stdout) == \
            {**st, "running": True}
        assert json.loads(llmctl("models", "--json", "-c", str(path)).stdout) == st["models"]


def test_the_bench_report_prints_whole_tables_to_a_pipe():
    summary = {"ok": 20, "errors": {}, "tokens_per_s": 12345.6, "requests_per_s": 123.45,
               "tokens_per_request": 64.0, "ttft_ms": {"p50": 12.3, "p99": 45.6},
               "itl_pooled_ms": {"p50": 1.2, "p99": 3.4},
               "e2e_ms": {"p50": 100.1, "p95": 200.2, "p99": 300.3}}
    targets = ["tcp://127.0.0.1:8080", "http://127.0.0.1:8081/v1"]
    result = {"machine": {"cpu_model": "Intel(R) Xeon(R) Platinum 8488C", "cores": 2},
              "config": {"max_tokens": 64, "mode": "closed", "targets": targets},
              "points": [{"target": t, "clients": 64, "rate": None, "summary": summary}
                         for t in targets],
              "comparisons": [{"clients": 64, "rate": None, "a": targets[0], "b": targets[1],
                               "ratios": {"tokens_per_s": 1.05, "requests_per_s": 1.04,
                                          "ttft_p50": 0.98, "e2e_p50": 0.97, "e2e_p99": 0.95}}]}
    r = subprocess.run([sys.executable, "-c", "import json, sys; from llmctl.tools.bench_report "
                        "import print_report; print_report(json.load(sys.stdin))"],
                       input=json.dumps(result), capture_output=True, text=True, cwd=ROOT,
                       env=NARROW, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    assert "Intel(R) Xeon(R) Platinum 8488C, 2 cores" in r.stdout      # the title, whole
    for t in targets:
        cells = [c.strip() for c in the_line(r.stdout, f"│ {t}").strip("│ ").split("│")]
        assert cells == [t, "64", "20", "0", "12345.6", "123.45", "64.0", "12.3", "45.6",
                         "1.2", "3.4", "100.1", "200.2", "300.3"]
    ratios = [c.strip() for c in the_line(r.stdout, "│ clients=64").strip("│ ").split("│")]
    assert ratios == ["clients=64", "1.05", "1.04", "0.98", "0.97", "0.95"]


# ---- the steps of `llmctl start` ---------------------------------------------------------------

def cfg_with(**sections: dict[str, Any]) -> Config:
    c = Config()
    return msgspec.structs.replace(c, **{name: msgspec.structs.replace(getattr(c, name), **values)
                                         for name, values in sections.items()})


def gw(**kw: Any) -> dict[str, Any]:
    return {"id": "gateway", "state": "running", "listening": ["127.0.0.1:8080"],
            "http_listening": [], **kw}


def test_verdict_of_a_head():
    cfg = cfg_with()
    ready = {"ok": True, "gateway": gw(), "workers": [{"id": "w0", "state": "ready"}],
             "models": [{"load": "always"}]}
    assert start.verdict(cfg, ready, 42).started == \
        "llmctl started: supervisor pid 42, gateway 127.0.0.1:8080, 1/1 worker(s) ready"
    http = cfg_with(http={"enabled": True})
    assert start.verdict(http, ready, 42) == start.Verdict()           # HTTP not up yet
    up = {**ready, "gateway": gw(http_listening=["127.0.0.1:8081"])}
    assert "gateway 127.0.0.1:8080, http://127.0.0.1:8081, 1/1" in \
        start.verdict(http, up, 42).started
    lazy = {**ready, "workers": [], "models": [{"load": "on_demand"}]}
    assert "0/0 worker(s) ready" in start.verdict(cfg, lazy, 42).started
    starting = {**ready, "workers": [{"id": "w0", "state": "starting"}]}
    assert start.verdict(cfg, starting, 42) == start.Verdict()
    fatal = {**ready, "workers": [{"id": "w0", "state": "fatal"}]}
    assert start.verdict(cfg, fatal, 42).failed == "processes failed: w0"
    assert start.verdict(cfg, {**ready, "gateway": gw(state="fatal", listening=[])},
                         42).failed == "processes failed: gateway"
    assert start.verdict(cfg, None, 42) == start.verdict(cfg, {"ok": False}, 42) == \
        start.Verdict()


def test_verdict_of_a_node():
    cfg = cfg_with(node={"join": "tcp://127.0.0.1:5555", "name": "gpu1"})
    loaded = {"ok": True, "workers": [{"id": "w0", "state": "running", "link": "joined"},
                                      {"id": "w1", "state": "connecting"}]}
    assert start.verdict(cfg, loaded, 7).started == (
        "llmctl node gpu1 started: supervisor pid 7, 2 worker(s) loaded, 1 joined the head "
        "at tcp://127.0.0.1:5555 (the others join as soon as it answers)")
    waiting = {"ok": True, "workers": [{"id": "w0", "state": "starting"}]}
    assert start.verdict(cfg, waiting, 7) == start.Verdict()
    fatal = {"ok": True, "workers": [{"id": "w0", "state": "fatal"}]}
    assert start.verdict(cfg, fatal, 7).failed == "processes failed: w0"


def test_a_head_listens_where_its_config_says_and_a_node_nowhere():
    cfg = cfg_with(cluster={"bind": "tcp://*:5555"})
    assert start.listen_addresses(cfg) == [("127.0.0.1", 8080), ("127.0.0.1", 8081),
                                           ("0.0.0.0", 5555)]
    assert start.listen_addresses(cfg_with(cluster={"bind": "tcp://[::1]:5555"}))[2:] == []
    assert start.listen_addresses(cfg_with(node={"join": "tcp://127.0.0.1:5555"})) == []


def test_a_port_in_use_refuses_the_start():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(start.StartRefused, match=f"cannot listen on 127.0.0.1:{port}: "):
            start.check_ports(cfg_with(gateway={"port": port}, http={"port": 0}))
    start.check_ports(cfg_with(gateway={"port": 0}, http={"port": 0}))


def test_missing_files_refuse_the_start(tmp_path):
    cfg = cfg_with(model={"path": str(tmp_path / "nope.gguf")})
    with pytest.raises(start.StartRefused) as exc:
        start.check_model_files(cfg)
    assert str(exc.value) == (f"model file not found: {tmp_path / 'nope.gguf'}\n  run `make "
                              "setup` (or python -m llmctl.tools.fetch_model) to fetch the "
                              "default model")
    synthetic = cfg_with(model={"path": str(tmp_path / "nope.gguf"), "engine": "synthetic"})
    start.check_model_files(synthetic)
    assert start.fit_memory(synthetic) is synthetic           # no model file, no plan
    keys = cfg_with(node={"join": "tcp://10.0.0.1:5555",
                          "secret_key": str(tmp_path / "n.key_secret")})
    with pytest.raises(start.StartRefused, match="n.key_secret"):
        start.check_keys(keys)


def test_start_when_running_changes_nothing(tmp_path, capsys):
    cfg = cfg_with(control={"run_dir": str(tmp_path)})
    assert supervisor_client.call(cfg, admin.Status()) is None          # none runs
    cfg.pidfile.write_text(f"{os.getpid()}\n")
    assert supervisor_client.call(cfg, admin.Status()) is None          # no control socket
    assert start.cmd_start(cfg, argparse.Namespace(foreground=False)) == 0
    assert capsys.readouterr().out == \
        f"llmctl is already running (supervisor pid {os.getpid()}); nothing changed.\n"
