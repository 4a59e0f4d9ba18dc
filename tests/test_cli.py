"""The command line without a real service: the steps of `llmctl start`."""
from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import msgspec
import pytest

from llmctl.common import admin
from llmctl.common.config import Config
from llmctl.control import start, supervisor_client


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
