"""Cluster configuration and CURVE keys: what a head or a node may be started with."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from llmctl.common import config, keys
from llmctl.common.config import ConfigError
from llmctl.control.child import WorkerProcess
from llmctl.control.states import ProcessState

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


@pytest.mark.parametrize("text, fragment", [
    ('[cluster]\nbind = "tcp://0.0.0.0:5555"\n', "without CURVE is refused"),
    ('[cluster]\nbind = "tcp://0.0.0.0:5555"\nallow_insecure = true\n', "not a loopback"),
    ('[cluster]\nbind = "tcp://10.0.0.1:5555"\nsecret_key = "h.key_secret"\n',
     "without CURVE is refused"),
    ('[cluster]\nbind = "ipc:///tmp/x"\nallow_insecure = true\n', "is not tcp://HOST:PORT"),
    ('[cluster]\nbind = "tcp://127.0.0.1:99999"\nallow_insecure = true\n', "tcp://HOST:PORT"),
    ('[node]\njoin = "tcp://head:5555"\n', "without CURVE is refused"),
    ('[node]\njoin = "tcp://head:5555"\nallow_insecure = true\n', "not a loopback"),
    ('[node]\njoin = "tcp://127.0.0.1:5555"\nallow_insecure = true\n'
     '[cluster]\nbind = "tcp://127.0.0.1:5556"\nallow_insecure = true\n', "not both"),
    ('[node]\nname = "a/b"\n', "no '/'"),
])
def test_refused(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(tmp_path, text)


def test_head_and_node_paths_resolve_against_the_config(tmp_path):
    head = load(tmp_path, '[cluster]\nbind = "tcp://0.0.0.0:5555"\nsecret_key = "k/h.key_secret"'
                          '\nauthorized_keys = "auth"\n')
    assert head.cluster.secret_key == str(tmp_path / "k/h.key_secret")
    assert head.cluster.authorized_keys == str(tmp_path / "auth")
    assert not head.is_node and head.worker_endpoint == head.workers_endpoint
    node = load(tmp_path, '[node]\njoin = "tcp://head:5555"\nname = "gpu1"\n'
                          'secret_key = "gpu1.key_secret"\nhead_key = "head.key"\n')
    assert node.is_node and node.worker_endpoint == "tcp://head:5555"
    assert node.node.head_key == str(tmp_path / "head.key")
    local = load(tmp_path, '[cluster]\nbind = "tcp://127.0.0.1:5555"\nallow_insecure = true\n')
    assert local.cluster.allow_insecure


def test_node_worker_ids_carry_the_node_name(tmp_path):
    node = load(tmp_path, '[node]\njoin = "tcp://127.0.0.1:5555"\nname = "gpu1"\n'
                          'allow_insecure = true\n')
    node.log_dir.mkdir(parents=True)
    w = WorkerProcess("w0", node)
    assert w.routing_id.startswith("gpu1/w0.")
    argv = w.argv()
    assert argv[argv.index("--endpoint") + 1] == "tcp://127.0.0.1:5555"
    assert argv[argv.index("--report") + 1] == node.node_endpoint
    head = load(tmp_path, "")
    assert "--report" not in WorkerProcess("w0", head).argv()


def test_keys_generate_modes_and_no_overwrite(tmp_path):
    pub, sec = keys.generate(tmp_path, "gpu1")
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub).st_mode) == 0o644
    public, secret = keys.load_secret(sec)
    assert keys.load_public(pub) == public and len(secret) == 40
    with pytest.raises(keys.CurveKeyError, match="never overwritten"):
        keys.generate(tmp_path, "gpu1")
    with pytest.raises(keys.CurveKeyError, match="no secret key"):
        keys.load_secret(pub)
    os.chmod(sec, 0o644)
    with pytest.raises(keys.CurveKeyError, match="must be private"):
        keys.load_secret(sec)
    (tmp_path / "junk.key").write_text("public-key = \"short\"\n")
    with pytest.raises(keys.CurveKeyError, match="z85"):
        keys.load_public(tmp_path / "junk.key")


def test_authorized_directory_is_read_each_time(tmp_path):
    auth = tmp_path / "auth"
    auth.mkdir()
    pub, _ = keys.generate(tmp_path, "n1")
    assert keys.authorized(auth) == {}
    (auth / "n1.key").write_bytes(pub.read_bytes())
    (auth / "broken.key").write_text("nothing here\n")
    found = keys.authorized(auth)
    assert list(found.values()) == ["n1.key"]
    (auth / "n1.key").unlink()
    assert keys.authorized(auth) == {}


def test_fingerprint_is_stable_and_short(tmp_path):
    pub, _ = keys.generate(tmp_path, "n1")
    key = keys.load_public(pub)
    fp = keys.fingerprint(key)
    assert len(fp) == 16 and fp == keys.fingerprint(key)
    other, _ = zmq.curve_keypair()
    assert keys.fingerprint(other) != fp


def test_cli_keys(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmctl.control", "keys", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    r = run("generate", "head", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    fp = keys.fingerprint(keys.load_public(tmp_path / "head.key"))
    assert f"fingerprint {fp}" in r.stdout
    r = run("fingerprint", str(tmp_path / "head.key"))
    assert r.stdout.split()[0] == fp
    r = run("generate", "head", "--dir", str(tmp_path))
    assert r.returncode == 2 and "never overwritten" in r.stderr


def test_head_status_lists_other_machines_workers():
    from llmctl.control.node import remote_workers

    info = {"slots": 2, "credits": 1, "inflight": 1, "parked": 0, "served": 5,
            "device": "cuda:0", "kv_store": {}, "pid": 7, "state": "busy", "last_seen_s": 0.1}
    live = {"w0.1": {**info, "name": "w0", "node": "head"},
            "w0.0": {**info, "name": "w0", "node": "head"},          # an old local spawn
            "gpu1/w0.1": {**info, "name": "gpu1/w0", "node": "gpu1"}}
    out = remote_workers(live, {"w0.1"}, "head", {"gpu1/w0": {"tokens_per_s": 12.5}})
    assert [(w["id"], w["node"], w["remote"], w["tokens_per_s"]) for w in out] == \
        [("gpu1/w0", "gpu1", True, 12.5)]
    assert out[0]["inflight"] == 1 and out[0]["slots"] == 2


def test_node_status_shows_the_link(tmp_path):
    from llmctl.control.node import node_view

    node = load(tmp_path, '[node]\njoin = "tcp://127.0.0.1:5555"\nallow_insecure = true\n'
                          '[workers]\nslots = 4\n')
    node.log_dir.mkdir(parents=True)
    w = WorkerProcess("w0", node)
    w.to(ProcessState.STARTING)
    w.to(ProcessState.RUNNING)
    w.link, w.link_detail = "refused", "the head refused this node's key"
    snap: dict = {"state": "running"}
    node_view(w, snap)
    assert snap == {"state": "refused", "link": "refused", "slots": 4,
                    "link_detail": "the head refused this node's key"}
    w.link, w.link_detail = "joined", ""
    snap = {}
    node_view(w, snap)
    assert snap == {"state": "running", "link": "joined", "slots": 4}


def test_draining_is_a_message_of_workers_only():
    from llmctl.common import messages as m

    assert isinstance(m.from_worker(m.encode(m.Kind.DRAINING)), m.Draining)
    with pytest.raises(m.MessageError, match="does not send DRAINING"):
        m.from_gateway(m.encode(m.Kind.DRAINING))
    info = m.ReadyInfo(worker="gpu1/w0.1", pid=1, slots=2, node="gpu1")
    ready = m.from_worker(m.ready(info))
    assert isinstance(ready, m.Ready) and ready.info.node == "gpu1"
