"""The deep probe reaches a node's worker over TCP + CURVE like a local one (loopback, the
synthetic engine: the model's speed is not the point here; tests/test_cluster.py runs the
real model across network namespaces)."""
from __future__ import annotations

import pytest

from llmctl.common import keys
from tests.service import NodeService, Service, free_port, wait_until

pytestmark = pytest.mark.integration


def test_deep_probes_reach_a_remote_worker(tmp_path, make_service):
    auth = tmp_path / "auth"
    auth.mkdir()
    keys.generate(tmp_path, "head")
    pub, _ = keys.generate(tmp_path, "n1")
    (auth / "n1.key").write_bytes(pub.read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    workers = {"count": 1, "slots": 2, "heartbeat_interval_s": 0.5, "liveness": 4,
               "probe_interval_s": 0.3}
    model = {"engine": "synthetic"}
    head: Service = make_service(model=model, workers=workers, node={"name": "head"},
                                 cluster={"bind": endpoint,
                                          "secret_key": str(tmp_path / "head.key_secret"),
                                          "authorized_keys": str(auth)})
    r = head.start()
    assert r.returncode == 0, r.stderr
    node = NodeService([], model=model, workers=workers, node={
        "join": endpoint, "name": "n1", "secret_key": str(tmp_path / "n1.key_secret"),
        "head_key": str(tmp_path / "head.key")})
    try:
        r = node.start()
        assert r.returncode == 0, r.stdout + r.stderr

        def remote() -> dict:
            return next((w for w in head.status()["workers"] if w.get("node") == "n1"), {})

        # No client sends anything: what the remote worker serves are the gateway's probes.
        wait_until(lambda: remote().get("served", 0) >= 3, 30, "three probes answered by n1/w0")
        counters = head.counters()
        assert counters["probes"] >= 3 and counters["probes_failed"] == 0
        assert counters["done"] == 0                  # probes are not client requests
        assert remote()["state"] in ("ready", "busy")
    finally:
        node.stop()


def test_a_remote_peer_cannot_pose_as_a_local_worker(make_service):
    """Over the cluster endpoint (loopback, allow_insecure) an id without NODE/ is dropped;
    the same READY with a NODE/ id makes a worker."""
    import zmq

    from llmctl.common import messages as m

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # The posing peers send one READY and no heartbeat: a liveness bound far beyond the
    # test keeps the accepted one listed while the test reads the status.
    head: Service = make_service(model={"engine": "synthetic"}, node={"name": "head"},
                                 workers={"heartbeat_interval_s": 2.0, "liveness": 60},
                                 cluster={"bind": endpoint, "allow_insecure": True})
    r = head.start()
    assert r.returncode == 0, r.stderr
    ctx = zmq.Context()
    socks = []
    try:
        for wid in ("w0.1", "x/w0.1"):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, wid.encode())
            s.connect(endpoint)
            s.send_multipart(m.ready(m.ReadyInfo(worker=wid, pid=1, slots=1, node="x",
                                                 name=wid.split(".")[0])))
            socks.append(s)
        wait_until(lambda: any(w["id"] == "x/w0" for w in head.status()["workers"]), 20,
                   "the NODE/ worker at the head")
        wait_until(lambda: head.counters()["dropped_messages"] >= 1, 20, "the drop")
        ids = [w["id"] for w in head.status()["workers"]]
        assert sorted(ids) == ["w0", "x/w0"], ids   # the local w0 is the head's own
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
