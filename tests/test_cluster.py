"""A head and a node on real sockets across a real network boundary, the real model on both.

The node runs in its own network namespace, joined to the test's (the head's) by a veth
pair; the head binds its cluster endpoint on the veth address, so the node's workers reach
it over TCP with CURVE.  ``ip link set ... down`` cuts the link under running streams.
Without the rights to make namespaces the test skips with the reason, and the loopback
variant (head and node in this namespace, CURVE over 127.0.0.1) still runs what needs no
cut link: remote serving, the refusal of an unknown key and of plain TCP.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from llmctl.common import keys
from llmctl.common.client import Result
from llmctl.common.protocol import FrameType
from tests.service import ROOT, NodeService, Service, free_port, wait_until

pytestmark = pytest.mark.integration

INTERVAL, LIVENESS = 0.5, 4             # liveness bound: 2 s, on both sides
BOUND = INTERVAL * LIVENESS
NODE = "n1"


@dataclass
class Net:
    head_ip: str
    prefix: list[str]                    # runs a command on the node's side
    cut: Callable[[], None] | None       # None: the loopback variant cannot cut its link
    restore: Callable[[], None] | None


def _sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.fixture(scope="module", params=["netns", "loopback"])
def net(request):
    if request.param == "loopback":
        yield Net("127.0.0.1", [], None, None)
        return
    tag = f"{os.getpid() % 100_000}"
    ns, here, there = f"llmctl-{tag}", f"lh{tag}", f"ln{tag}"
    sub = f"10.231.{os.getpid() % 250}"
    steps = [("ip", "netns", "add", ns),
             ("ip", "link", "add", here, "type", "veth", "peer", "name", there),
             ("ip", "link", "set", there, "netns", ns),
             ("ip", "addr", "add", f"{sub}.1/30", "dev", here),
             ("ip", "link", "set", here, "up"),
             ("ip", "netns", "exec", ns, "ip", "addr", "add", f"{sub}.2/30", "dev", there),
             ("ip", "netns", "exec", ns, "ip", "link", "set", there, "up"),
             ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")]
    try:
        for step in steps:
            r = _sh(*step)
            if r.returncode:
                pytest.skip(f"cannot make a network namespace ({' '.join(step)}: "
                            f"{r.stderr.strip()}); the loopback variant runs instead")
        yield Net(f"{sub}.1", ["ip", "netns", "exec", ns],
                  lambda: _sh("ip", "link", "set", here, "down"),
                  lambda: _sh("ip", "link", "set", here, "up"))
    finally:
        _sh("ip", "link", "del", here)
        _sh("ip", "netns", "del", ns)


@dataclass
class Cluster:
    net: Net
    head: Service
    node: NodeService
    keydir: Path
    endpoint: str
    made: list[Service]

    def remote(self) -> dict[str, Any] | None:
        return next((w for w in self.head.status()["workers"] if w.get("node") == NODE), None)

    def remote_ready(self) -> bool:
        w = self.remote()
        return w is not None and w["state"] in ("ready", "busy")

    def new_node(self, name: str, **node: Any) -> NodeService:
        svc = NodeService(self.net.prefix, workers=_workers(), node={
            "join": self.endpoint, "name": name, **node})
        self.made.append(svc)
        return svc


def _workers() -> dict[str, Any]:
    return {"count": 1, "slots": 1, "heartbeat_interval_s": INTERVAL, "liveness": LIVENESS,
            "probe_interval_s": 0.0}


@pytest.fixture(scope="module")
def cluster(net, tmp_path_factory):
    keydir = tmp_path_factory.mktemp("keys")
    auth = keydir / "authorized"
    auth.mkdir()
    keys.generate(keydir, "head")
    keys.generate(keydir, NODE)
    keys.generate(keydir, "intruder")
    (auth / f"{NODE}.key").write_bytes((keydir / f"{NODE}.key").read_bytes())
    endpoint = f"tcp://{net.head_ip}:{free_port()}"
    head = Service(workers=_workers(), cluster={
        "bind": endpoint, "secret_key": str(keydir / "head.key_secret"),
        "authorized_keys": str(auth)}, node={"name": "head"})
    made: list[Service] = [head]
    c = Cluster(net, head, None, keydir, endpoint, made)  # type: ignore[arg-type]
    try:
        r = head.start()
        assert r.returncode == 0, r.stderr
        c.node = c.new_node(NODE, secret_key=str(keydir / f"{NODE}.key_secret"),
                        head_key=str(keydir / "head.key"))
        r = c.node.start()
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(c.remote_ready, 30, "the node's worker ready at the head")
        yield c
    finally:
        problems = []
        for svc in reversed(made):
            try:
                svc.stop()
            except AssertionError as exc:
                problems.append(str(exc))
        assert not problems, "\n".join(problems)


# ---- a client with several streams open ---------------------------------------------------

class Streams:
    def __init__(self, head: Service) -> None:
        self.c = head.client(timeout=60.0)
        self.results: dict[int, Result] = {}
        self.t_end: dict[int, float] = {}

    def start(self, stream: int, prompt: str, max_tokens: int) -> None:
        self.results[stream] = Result(stream)
        self.c.generate(stream, prompt=prompt, max_tokens=max_tokens, temperature=0.0)

    def pump_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            f = self.c.recv_frame()
            r = self.results[f.stream]
            r._add(f, time.monotonic())
            if f.type in (FrameType.DONE, FrameType.ERROR):
                self.t_end[f.stream] = time.monotonic()

    def ended(self, *streams: int) -> bool:
        return all(self.results[s].ended for s in streams)

    def close(self) -> None:
        self.c.close()


LONG = "Count from 1 to 500, one number per line:\n1\n2\n3\n"


def _pair(cl: Cluster, tag: str, max_tokens: int) -> Streams:
    """Two streams at once (one per worker: each has one slot, dispatch is LRU); which
    stream the node serves is known from its DONE (worker name)."""
    s = Streams(cl.head)
    s.start(1, f"{tag} alpha. " + LONG, max_tokens)
    s.start(2, f"{tag} beta. " + LONG, max_tokens)
    return s


def _pair_done(cl: Cluster, tag: str) -> Streams:
    """``_pair`` of 8 tokens, run until both have ended."""
    s = _pair(cl, tag, 8)
    try:
        s.pump_until(lambda: s.ended(1, 2), 120, "both answers")
    finally:
        s.close()
    return s


def _pair_under(cl: Cluster, tag: str, command: str, wait_s: float) -> Streams:
    """``_pair`` of 320 tokens (of a count to 500: no early end); once both stream,
    ``llmctl COMMAND`` on the node, which must succeed within ``wait_s``; returns when both
    streams have ended.  320 tokens outlast the command's start on a busy machine."""
    s = _pair(cl, tag, 320)
    try:
        s.pump_until(lambda: all(s.results[i].pieces for i in (1, 2)), 120, "tokens on both")
        proc = subprocess.Popen([*cl.net.prefix, sys.executable, "-m", "llmctl.control",
                                 command, "-c", str(cl.node.config)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        s.pump_until(lambda: s.ended(1, 2), 120, "both answers")
        assert proc.wait(wait_s) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        s.close()
    return s


# ---- the tests ------------------------------------------------------------------------------

def test_remote_node_serves(cluster):
    st = cluster.head.status()
    nodes = {w["id"]: w.get("node") for w in st["workers"]}
    assert nodes == {"w0": "head", f"{NODE}/w0": NODE}, nodes
    s = _pair_done(cluster, "serve")
    workers = {s.results[i].done["worker"] for i in (1, 2)}
    assert workers == {"w0", f"{NODE}/w0"}, [s.results[i].done or s.results[i].error
                                             for i in (1, 2)]
    node_st = cluster.node.status()
    assert [w["id"] for w in node_st["workers"]] == ["w0"]
    assert node_st["role"] == "node" and node_st["workers"][0]["link"] == "joined"


def _need_cut(cluster) -> None:
    if cluster.net.cut is None:
        pytest.skip("the loopback variant cannot cut its link (the netns variant does)")


def test_brief_link_loss_loses_nothing(cluster):
    """A cut shorter than the liveness bound: the streams go on, each ends once, DONE."""
    _need_cut(cluster)
    wait_until(cluster.remote_ready, 60, "the node ready")
    s = _pair(cluster, "blip", 48)
    try:
        s.pump_until(lambda: all(s.results[i].pieces for i in (1, 2)), 120, "tokens on both")
        cluster.net.cut()
        time.sleep(BOUND / 5)            # the stimulus: a link down for a fifth of the bound
        cluster.net.restore()
        s.pump_until(lambda: s.ended(1, 2), 120, "both answers")
    finally:
        cluster.net.restore()
        s.close()
    assert [s.results[i].error for i in (1, 2)] == [None, None]
    assert {s.results[i].done["worker"] for i in (1, 2)} == {"w0", f"{NODE}/w0"}
    assert cluster.head.counters()["worker_failed"] == 0


def test_link_cut_mid_stream_then_rejoin(cluster):
    """Cut under two running streams and a request dispatched to the node that has not
    produced a token: the node's running stream ends worker_failed, the fresh one is
    served by the head's worker; the link back, the node serves again by itself."""
    _need_cut(cluster)
    wait_until(cluster.remote_ready, 60, "the node ready")
    before = cluster.head.counters()
    s = _pair(cluster, "cut", 400)
    try:
        s.pump_until(lambda: all(s.results[i].pieces for i in (1, 2)), 120, "tokens on both")
        cluster.net.cut()
        t_cut = time.monotonic()
        # The stream on the node fails within the bound (plus a tick and a token step).
        s.pump_until(lambda: any(r.error for r in s.results.values()), BOUND + 10,
                     "the node's stream to fail")
        failed = [i for i, r in s.results.items() if r.error]
        assert len(failed) == 1 and s.results[failed[0]].error["code"] == "worker_failed"
        loss_s = s.t_end[failed[0]] - t_cut
        s.pump_until(lambda: s.ended(1, 2), 120, "the head's stream")
        other = 3 - failed[0]
        assert s.results[other].done["worker"] == "w0"
    finally:
        cluster.net.restore()
        s.close()
    print(f"link loss -> worker_failed: {loss_s:.2f}s (liveness bound {BOUND:.1f}s)")
    wait_until(cluster.remote_ready, 60, "the node to rejoin after the link is back")
    after = cluster.head.counters()
    assert after["worker_failed"] - before["worker_failed"] == 1

    # A request sent to the node just as the link dies: re-dispatched, answered once.
    before = after
    cluster.net.cut()                # first: the gateway still counts on the node's credit
    s = _pair(cluster, "fresh", 8)
    try:
        s.pump_until(lambda: s.ended(1, 2), BOUND + 120, "both answers")
    finally:
        cluster.net.restore()
        s.close()
    after = cluster.head.counters()
    assert [s.results[i].error for i in (1, 2)] == [None, None]
    assert {s.results[i].done["worker"] for i in (1, 2)} == {"w0"}
    assert after["requeued"] - before["requeued"] == 1
    assert after["worker_failed"] == before["worker_failed"]
    t_back = time.monotonic()
    wait_until(cluster.remote_ready, 60, "the node to rejoin")
    print(f"link return -> node ready again: {time.monotonic() - t_back:.2f}s")
    s = _pair_done(cluster, "again")
    assert {s.results[i].done["worker"] for i in (1, 2)} == {"w0", f"{NODE}/w0"}


def test_head_restart_is_survived(cluster):
    wait_until(cluster.remote_ready, 60, "the node ready")
    node_pid = cluster.node.worker()["pid"]
    assert cluster.head.llmctl("stop").returncode == 0
    r = cluster.head.start()
    assert r.returncode == 0, r.stderr
    wait_until(cluster.remote_ready, 60, "the node to rejoin the new head by itself")
    assert cluster.node.worker()["pid"] == node_pid           # the same process: no restart
    s = _pair_done(cluster, "restart")
    assert {s.results[i].done["worker"] for i in (1, 2)} == {"w0", f"{NODE}/w0"}


def test_unknown_key_refused_and_logged(cluster):
    intruder = cluster.new_node("intruder", secret_key=str(cluster.keydir / "intruder.key_secret"),
                            head_key=str(cluster.keydir / "head.key"))
    r = intruder.start()
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: intruder.worker().get("link") == "refused", 30, "the refusal")
    fp = keys.fingerprint(keys.load_public(cluster.keydir / "intruder.key"))
    log = (cluster.head.dir / "run" / "logs" / "gateway.log").read_text()
    assert f"unknown CURVE key, fingerprint {fp}" in log
    assert all(w.get("node") != "intruder" for w in cluster.head.status()["workers"])
    assert intruder.stop().returncode == 0


PLAIN_CLIENT = """
import sys, zmq
from llmctl.common import messages as m
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.IDENTITY, b"plain/w0.1"); s.connect(sys.argv[1])
s.send_multipart(m.ready(m.ReadyInfo(worker="plain/w0.1", pid=1, slots=1, node="plain")))
print("answered" if s.poll(3 * 1000) else "no answer"); s.close(); ctx.term()
"""


def test_plain_tcp_refused(cluster):
    """A NULL-security (plain TCP) worker speaking the protocol gets nothing and is never
    a worker of the head; the config refuses to join without CURVE off loopback."""
    r = subprocess.run([*cluster.net.prefix, sys.executable, "-c", PLAIN_CLIENT,
                        cluster.endpoint], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.stdout.strip() == "no answer", r.stdout + r.stderr
    assert all(w.get("node") != "plain" for w in cluster.head.status()["workers"])
    wait_until(lambda: "the security handshake failed: not a CURVE client" in (
        cluster.head.dir / "run" / "logs" / "gateway.log").read_text(), 10, "the refusal logged")
    if cluster.net.cut is not None:      # a non-loopback join without keys: refused up front
        plain = cluster.new_node("plain", allow_insecure=True)
        r = plain.start()
        assert r.returncode == 2 and "is not a loopback address" in r.stderr, r.stderr


def test_a_reload_on_the_node_loses_no_stream(cluster):
    """`llmctl reload` on a node: the new worker joins the head before the old one drains
    (it says DRAINING to the gateway) and stops; the stream the old one ran ends in DONE."""
    wait_until(cluster.remote_ready, 60, "the node ready")
    old_pid = cluster.node.worker()["pid"]
    before = cluster.head.counters()
    text = cluster.node.config.read_text()
    cluster.node.config.write_text(text.replace("[workers]\n", "[workers]\nprompt_cache_mib = 64\n"))
    s = _pair_under(cluster, "reload", "reload", 180)
    assert [s.results[i].error for i in (1, 2)] == [None, None]
    assert cluster.head.counters()["worker_failed"] == before["worker_failed"]
    w = cluster.node.worker()
    assert w["pid"] != old_pid and w["link"] == "joined"
    wait_until(cluster.remote_ready, 60, "the new worker ready at the head")


def test_stopping_a_node_drains_it(cluster):
    """`llmctl stop` on a node: its worker tells the gateway it drains, finishes the stream
    it runs (DONE, not worker_failed) and only then stops."""
    wait_until(cluster.remote_ready, 60, "the node ready")
    before = cluster.head.counters()
    s = _pair_under(cluster, "drain", "stop", 120)
    assert [s.results[i].error for i in (1, 2)] == [None, None]
    assert {s.results[i].done["worker"] for i in (1, 2)} == {"w0", f"{NODE}/w0"}
    assert cluster.head.counters()["worker_failed"] == before["worker_failed"]
    wait_until(lambda: cluster.remote() is None, 30, "the node gone from the head")
    log = (cluster.node.dir / "run" / "logs" / "w0.log").read_text()
    assert "draining: finishing 1 request(s)" in log
