"""``python -m llmctl.tools.request_path``: the tracing hook (``tools/call_trace.py``), the
comparison of a request window with an idle one, the service's config, and the tool run
against synthetic workers."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from llmctl.tools import call_trace, request_path
from llmctl.tools.request_path_report import compare, report_json
from llmctl.tools.service_status import toml_text
from tests.service import LOG_PROBLEMS, MODEL, ROOT


def code_in(root: Path, file: str, src: str = "def f():\n    pass\n"):
    """The code object of ``f`` as if defined in ``root/file``."""
    module = compile(src, str(root / file), "exec")
    return next(c for c in module.co_consts if hasattr(c, "co_qualname"))


# ---- the hook ---------------------------------------------------------------------------

def test_project_file_keeps_the_service_packages_only():
    root = str(ROOT)
    assert call_trace.project_file(str(ROOT / "dataplane" / "tcp.py"), root) == "dataplane/tcp.py"
    assert call_trace.project_file(str(ROOT / "dataplane" / "http" / "openai.py"), root) \
        == "dataplane/http/openai.py"
    assert call_trace.project_file(str(ROOT / "worker" / "main.py"), root) == "worker/main.py"
    assert call_trace.project_file(str(ROOT / "common" / ".." / "control" / "child.py"), root) \
        == "control/child.py"
    for other in (ROOT / "tools" / "bench.py", ROOT / "tests" / "service.py",
                  ROOT / "llmctl" / "__init__.py", ROOT / "setup.py", Path(json.__file__),
                  ROOT / "dataplane" / "x.so"):
        assert call_trace.project_file(str(other), root) is None, other
    assert call_trace.project_file("<frozen importlib._bootstrap>", root) is None
    assert call_trace.project_file("<string>", root) is None


def test_functions_are_the_project_ones_sorted_by_file_line_and_name(tmp_path):
    codes = [code_in(tmp_path, "worker/main.py", "\n\ndef g():\n    pass\n"),
             code_in(tmp_path, "dataplane/tcp.py"),
             code_in(tmp_path, "tools/bench.py"),
             code_in(tmp_path, "dataplane/tcp.py")]
    assert call_trace.functions(codes, str(tmp_path)) == [
        ["dataplane/tcp.py", 1, "f"], ["worker/main.py", 3, "g"]]


def test_a_window_records_what_is_called_while_it_is_open(tmp_path):
    rec = call_trace.Recorder(str(tmp_path), str(tmp_path))
    ns: dict = {}
    exec(compile("def inside():\n    pass\ndef outside():\n    pass\n",
                 str(tmp_path / "dataplane" / "fake.py"), "exec"), ns)
    control = tmp_path / call_trace.CONTROL_FILE
    seen = rec.poll(None)                        # no control file yet: nothing happens
    assert not rec.on and not list(tmp_path.glob("*.on"))
    sys.setprofile(rec.profile)
    try:
        ns["outside"]()
        control.write_text("w1")
        seen = rec.poll(seen)
        ns["inside"]()
        assert rec.poll(seen) == seen            # the same file: nothing changes
        control.unlink()
        control.write_text("")
        seen = rec.poll(seen)
        ns["outside"]()
    finally:
        sys.setprofile(None)
    pid = os.getpid()
    assert (tmp_path / f"w1.{pid}.on").exists()
    record = json.loads((tmp_path / f"w1.{pid}.json").read_text())
    assert record["label"] == "w1" and record["pid"] == pid
    assert record["functions"] == [["dataplane/fake.py", 1, "inside"]]


def test_install_does_nothing_without_its_environment(monkeypatch):
    monkeypatch.delenv(call_trace.TRACE_DIR_ENV, raising=False)
    assert call_trace.install() is None
    assert sys.getprofile() is None


# ---- the comparison ---------------------------------------------------------------------

def test_the_request_files_are_the_request_window_minus_the_idle_one():
    request = {("dataplane/tcp.py", 30, "Connection.run"), ("dataplane/link.py", 10, "tick"),
               ("dataplane/link.py", 50, "send"), ("common/messages.py", 5, "encode")}
    idle = {("dataplane/link.py", 10, "tick"), ("common/messages.py", 5, "encode"),
            ("dataplane/clock.py", 3, "tick")}
    c = compare(request, idle)
    assert c["raw"] == ["common/messages.py", "dataplane/link.py", "dataplane/tcp.py"]
    assert c["request"] == ["dataplane/tcp.py"]
    assert c["with_new_function"] == ["dataplane/link.py", "dataplane/tcp.py"]
    assert c["new_functions"] == {"dataplane/link.py": ["send"],
                                  "dataplane/tcp.py": ["Connection.run"]}
    assert c["called"]["dataplane/link.py"] == 2


def test_the_total_is_the_distinct_files_over_the_processes(tmp_path):
    for f, n in (("common/prefix.py", 3), ("dataplane/tcp.py", 5), ("worker/main.py", 7)):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x\n" * n)
    procs = {"dataplane": compare({("common/prefix.py", 1, "a"), ("dataplane/tcp.py", 1, "b")},
                                  set()),
             "worker": compare({("common/prefix.py", 1, "a"), ("worker/main.py", 1, "c")},
                               {("worker/main.py", 1, "c")})}
    doc = report_json({"tcp": {"title": "t", "window_s": 1.0, "request_s": 0.1,
                               "processes": procs}}, tmp_path)
    counts = doc["kinds"]["tcp"]["counts"]
    assert counts["worker"]["request"] == {"files": 1, "lines": 3}
    assert counts["total"]["raw"] == {"files": 3, "lines": 15}
    assert counts["total"]["request"] == {"files": 2, "lines": 8}
    assert doc["lines"] == {"common/prefix.py": 3, "dataplane/tcp.py": 5, "worker/main.py": 7}


# ---- the service's config ---------------------------------------------------------------

def test_toml_text_reads_back_as_the_same_tree():
    raw = {"model": {"path": "/m/x.gguf", "n_ctx": 1024, "flash_attn": "auto"},
           "gateway": {"token": 'a "quoted" tøken\\', "uvloop": False, "park_after_s": 1.5},
           "tenants": [{"name": "a", "keys": ["k1", "k2"]}, {"name": "b", "weight": 2}],
           "scheduling": {"classes": {"x": 1}}}
    assert tomllib.loads(toml_text(raw)) == raw


def test_a_given_config_keeps_its_settings_with_absolute_paths_and_free_ports(tmp_path):
    (tmp_path / "conf.toml").write_text(
        '[model]\npath = "m.gguf"\nengine = "synthetic"\n[workers]\nslots = 3\n'
        '[gateway]\nport = 8080\n')
    raw = request_path.service_config(str(tmp_path / "conf.toml"), tmp_path / "run")
    assert raw["model"] == {"path": str(tmp_path / "m.gguf"), "engine": "synthetic"}
    assert raw["workers"] == {"slots": 3, "probe_interval_s": 0.0}
    assert raw["gateway"]["port"] != 8080 and raw["http"]["enabled"] is True
    assert raw["control"] == {"run_dir": str(tmp_path / "run")}


def test_each_served_model_keeps_its_path_made_absolute(tmp_path):
    (tmp_path / "conf.toml").write_text(
        '[[models]]\nname = "a"\npath = "a.gguf"\n'
        '[[models]]\nname = "b"\npath = "/abs/b.gguf"\nload = "on_demand"\n')
    raw = request_path.service_config(str(tmp_path / "conf.toml"), tmp_path / "run")
    assert raw["models"] == [{"name": "a", "path": str(tmp_path / "a.gguf")},
                             {"name": "b", "path": "/abs/b.gguf", "load": "on_demand"}]
    assert "model" not in raw        # [model] path may not be given beside [[models]]
    assert tomllib.loads(toml_text(raw))["models"] == raw["models"]


# ---- the tool on synthetic workers ------------------------------------------------------

@pytest.mark.integration
def test_a_tcp_generate_passes_through_the_tcp_front_and_the_worker_loop(capsys):
    # A short directory: the service's ipc:// socket paths must stay under ~100 characters.
    short = tempfile.mkdtemp(prefix="rp-")
    conf = Path(short) / "synthetic.toml"
    conf.write_text(f'[model]\npath = "{MODEL}"\nengine = "synthetic"\n'
                    '[workers]\ncount = 1\nslots = 2\nheartbeat_interval_s = 0.5\n'
                    '[synthetic]\nstep_ms = 1.0\n')
    saved = tempfile.tempdir
    tempfile.tempdir = short                    # the tool's run directory goes here
    try:
        rc = request_path.main(["-c", str(conf), "--kinds", "tcp", "--min-window", "1.5",
                                "--keep", "--json", str(Path(short) / "out.json")])
        out = capsys.readouterr()
        assert rc == 0, out.err
        logs = [p for p in Path(short).glob("llmctl-path-*/run/logs/*")]
        assert logs
        for log in logs:
            assert not any(p in log.read_text(errors="replace") for p in LOG_PROBLEMS), log
        doc = json.loads((Path(short) / "out.json").read_text())
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(short, ignore_errors=True)
    tcp = doc["kinds"]["tcp"]
    dp, worker = tcp["processes"]["dataplane"], tcp["processes"]["worker"]
    assert "dataplane/tcp.py" in dp["request"]
    assert "serve_binary.<locals>.handle" in dp["new_functions"]["dataplane/main.py"]
    # The worker's loop runs idle too (heartbeats): its file is in both windows, and the
    # request calls functions of it that idle does not.
    assert "worker/main.py" in worker["raw"]
    assert "Worker._generate" in worker["new_functions"]["worker/main.py"]
    assert not [f for p in tcp["processes"].values() for f in p["raw"]
                if f.startswith("dataplane/http/") or f == "dataplane/cc50.py"]
    assert tcp["counts"]["total"]["request"]["files"] >= 3
    assert "tcp: one GENERATE" in out.out
