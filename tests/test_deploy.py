"""deploy/: the systemd units and Kubernetes manifests parse, hang together, and carry
configs that llmctl's own validation accepts."""
from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest
import yaml

from llmctl.common import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"


def docs() -> list[dict]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            doc["__file"] = path.name
            out.append(doc)
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for d in docs() if d["kind"] == kind]


def test_every_manifest_has_the_basic_schema():
    seen = set()
    for d in docs():
        where = f"{d['__file']}: {d.get('kind')}"
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), where
        assert isinstance(d["metadata"].get("name"), str) and d["metadata"]["name"], where
        key = (d["kind"], d["metadata"]["name"])
        assert key not in seen, f"{where}: {key} twice"
        seen.add(key)
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert d["apiVersion"] == "apps/v1", where
        else:
            assert d["apiVersion"] == "v1", where
    assert {k for k, _ in seen} >= {"Deployment", "StatefulSet", "Service", "Secret", "ConfigMap"}


WORKLOADS = ("Deployment", "StatefulSet")


@pytest.mark.parametrize("kind", WORKLOADS)
def test_workloads_are_consistent(kind):
    configmaps = {d["metadata"]["name"]: d for d in by_kind("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in by_kind("Secret")}
    services = {d["metadata"]["name"] for d in by_kind("Service")}
    for w in by_kind(kind):
        spec = w["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        if kind == "StatefulSet":
            assert spec["serviceName"] in services
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["image"] and c["command"][:3] == ["llmctl", "start", "--foreground"]
            conf_path = c["command"][c["command"].index("-c") + 1]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert set(mounts.values()) <= volumes.keys(), "a mount of no volume"
            # The config file the command names is in a mounted ConfigMap ...
            mount_dir, name = conf_path.rsplit("/", 1)
            vol = volumes[mounts[mount_dir]]
            text = configmaps[vol["configMap"]["name"]]["data"][name]
            cfg = config._build(config.msgspec.toml.decode(text.encode()), name, base=None)
            # ... and every file it names lies in a mounted volume that holds it.
            for path in [cfg.cluster.secret_key, cfg.node.secret_key, cfg.node.head_key]:
                if not path:
                    continue
                d, f = path.rsplit("/", 1)
                src = volumes[mounts[d]]["secret"]
                assert f in secrets[src["secretName"]]["stringData"], path
                assert src["defaultMode"] & 0o037 == 0 or f.endswith(".key"), \
                    f"{path}: a secret key others may read"
            if cfg.cluster.authorized_keys:
                assert cfg.cluster.authorized_keys in mounts
            if cfg.cluster.bind:
                port = int(cfg.cluster.bind.rsplit(":", 1)[1])
                assert port in {p["containerPort"] for p in c["ports"]}


def test_services_select_a_workload_and_its_ports():
    pods = [(w["spec"]["template"]["metadata"]["labels"], w["spec"]["template"]["spec"])
            for kind in WORKLOADS for w in by_kind(kind)]
    for s in by_kind("Service"):
        sel = s["spec"]["selector"]
        match = [spec for labels, spec in pods if sel.items() <= labels.items()]
        assert match, f"Service {s['metadata']['name']} selects no pod"
        names = {p["name"] for spec in match for c in spec["containers"]
                 for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert isinstance(target, int) or target in names, (s["metadata"]["name"], target)


def test_node_joins_the_head_service():
    cm = by_kind("ConfigMap")[0]["data"]
    node = config._build(config.msgspec.toml.decode(cm["node.toml"].encode()), "n", base=None)
    head = config._build(config.msgspec.toml.decode(cm["head.toml"].encode()), "h", base=None)
    host, port = node.node.join.removeprefix("tcp://").rsplit(":", 1)
    svc = next(s for s in by_kind("Service") if host.startswith(s["metadata"]["name"] + "."))
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert head.cluster.bind.endswith(f":{port}")


@pytest.mark.parametrize("unit", sorted((DEPLOY / "systemd").glob("*.service")),
                         ids=lambda p: p.name)
def test_systemd_units(unit):
    ini = configparser.ConfigParser(strict=True, interpolation=None)
    ini.optionxform = str                        # systemd keys are case-sensitive
    ini.read_string(unit.read_text())
    assert set(ini.sections()) == {"Unit", "Service", "Install"}
    svc = ini["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].startswith("/") and argv[1:4] == ["start", "--foreground", "-c"]
    assert svc["KillSignal"] == "SIGTERM" and svc["Restart"] == "always"
    # The config the unit names is the one in deploy/, and it validates.
    name = Path(argv[4]).name
    cfg = config.load(DEPLOY / name)
    assert cfg.is_node == ("node" in unit.name)
    assert ini["Install"]["WantedBy"] == "multi-user.target"
