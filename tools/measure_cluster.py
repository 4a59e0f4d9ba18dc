"""Measure a head and a node across two network namespaces (a benchmark, not a test).

    sudo python -m llmctl.tools.measure_cluster [--model M.gguf] [--json PATH]

Makes a network namespace joined to this one by a veth pair, CURVE keys, a head here and
a node there (one worker each, ``[workers] slots = 1``), and measures:

1. per-token added latency, remote (TCP + CURVE across the veth) against local (ipc), in
   one run: both run the synthetic engine with ``stamp = true`` (each token's text is the
   CLOCK_MONOTONIC time it was made, a clock both namespaces share); the client takes
   arrival - stamp for every token and groups by the worker that served it;
2. gateway CPU per 1,000 tokens/s with the remote worker (synthetic, 16 slots), from
   /proc of the gateway: the capacity of one gateway in nodes;
3. aggregate tokens/s with the real model: head alone (node stopped) and head + node,
   ``llmctl bench`` closed loop with 2 clients;
4. link loss -> ``worker_failed`` (a stream on the node, ``ip link set down``) and link
   return -> the node serving again (real model).

Needs root (``ip netns``).  The figures of docs/benchmarks.md come from this tool.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmctl.common import keys
from llmctl.common.sync_client import Client
from llmctl.common.protocol import FrameType
from llmctl.common.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode:
        raise SystemExit(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


class Net:
    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.ns, self.here, self.there = f"llmm-{tag}", f"mh{tag}", f"mn{tag}"
        sub = f"10.232.{os.getpid() % 250}"
        self.head_ip = f"{sub}.1"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.here, "type", "veth", "peer", "name", self.there)
        sh("ip", "link", "set", self.there, "netns", self.ns)
        sh("ip", "addr", "add", f"{sub}.1/30", "dev", self.here)
        sh("ip", "link", "set", self.here, "up")
        ex = ["ip", "netns", "exec", self.ns]
        sh(*ex, "ip", "addr", "add", f"{sub}.2/30", "dev", self.there)
        sh(*ex, "ip", "link", "set", self.there, "up")
        sh(*ex, "ip", "link", "set", "lo", "up")
        self.prefix = ex

    def link(self, up: bool) -> None:
        sh("ip", "link", "set", self.here, "up" if up else "down")

    def close(self) -> None:
        sh("ip", "link", "del", self.here, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def toml(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(f"[{n}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kv.items())
                   + "\n" for n, kv in sections.items())


class Cluster:
    def __init__(self, net: Net, model: str, engine: str, slots: int, stamp: bool) -> None:
        self.net = net
        self.dir = Path(tempfile.mkdtemp(prefix="llmctl-m-"))
        kd = self.dir / "keys"
        keys.generate(kd, "head")
        keys.generate(kd, "n1")
        (kd / "auth").mkdir()
        (kd / "auth" / "n1.key").write_bytes((kd / "n1.key").read_bytes())
        self.port = 18600 + os.getpid() % 1000
        common = {"model": {"path": model, "engine": engine, "n_ctx": 1024, "threads": 1},
                  "workers": {"count": 1, "slots": slots, "heartbeat_interval_s": 0.5,
                              "liveness": 4, "probe_interval_s": 0.0},
                  "synthetic": {"stamp": stamp, "step_ms": 1.0}}
        self.endpoint = f"tcp://{net.head_ip}:{self.port + 2}"
        self.head = self.dir / "head.toml"
        self.head.write_text(toml({**common, "gateway": {"port": self.port},
                                   "http": {"port": self.port + 1},
                                   "control": {"run_dir": str(self.dir / "h")},
                                   "node": {"name": "head"},
                                   "cluster": {"bind": self.endpoint,
                                               "secret_key": str(kd / "head.key_secret"),
                                               "authorized_keys": str(kd / "auth")}}))
        self.node = self.dir / "node.toml"
        self.node.write_text(toml({**common, "control": {"run_dir": str(self.dir / "n")},
                                   "node": {"name": "n1", "join": self.endpoint,
                                            "secret_key": str(kd / "n1.key_secret"),
                                            "head_key": str(kd / "head.key")}}))

    def llmctl(self, conf: Path, *args: str, remote: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([*(self.net.prefix if remote else []), sys.executable, "-m",
                               "llmctl.control", *args, "-c", str(conf)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)

    def start(self, node: bool = True) -> None:
        for conf, remote in [(self.head, False), *([(self.node, True)] if node else [])]:
            r = self.llmctl(conf, "start", remote=remote)
            if r.returncode:
                raise SystemExit(f"start {conf.name}: {r.stdout}{r.stderr}")
        if node:
            self.wait(self.node_ready, 60)

    def stop(self) -> None:
        self.llmctl(self.node, "stop", remote=True)
        self.llmctl(self.head, "stop")

    def status(self) -> dict[str, Any]:
        return json.loads(self.llmctl(self.head, "status", "--json").stdout)

    def node_ready(self) -> bool:
        return any(w.get("node") == "n1" and w["state"] in ("ready", "busy")
                   for w in self.status().get("workers", []))

    @staticmethod
    def wait(cond, timeout: float) -> float:
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise SystemExit("timed out")
            time.sleep(0.02)
        return time.monotonic() - t0

    def client(self) -> Client:
        c = Client("127.0.0.1", self.port, timeout=120)
        c.hello()
        return c


def added_latency(cl: Cluster, rounds: int, tokens: int) -> dict[str, Any]:
    by: dict[str, list[float]] = {}
    c = cl.client()
    try:
        for i in range(rounds):
            for s in (1, 2):          # one stream per worker (1 slot each, LRU dispatch)
                c.generate(s, prompt=f"r{i} s{s}", max_tokens=tokens)
            res = c.collect({1, 2})
            for r in res.values():
                assert r.done, r.error
                lat = [(t - int(p.split()[0]) / 1e9) * 1e6 for p, t in zip(r.pieces, r.piece_times)]
                by.setdefault(r.done["worker"], []).extend(lat)
    finally:
        c.close()
    return {w: {"tokens": len(v), "p50_us": round(percentile(v, 50), 1),
                "p99_us": round(percentile(v, 99), 1)} for w, v in by.items()}


def gateway_cpu(cl: Cluster, seconds: float, clients: int) -> dict[str, Any]:
    pid = cl.status()["gateway"]["pid"]

    def cpu() -> float:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TICKS

    before = cl.status()["gateway"]["counters"]
    t0, c0 = time.monotonic(), cpu()
    r = subprocess.run([sys.executable, "-m", "llmctl.tools.bench", "--target",
                        f"tcp://127.0.0.1:{cl.port}", "--clients", str(clients), "--duration",
                        str(seconds), "--max-tokens", "256", "--quiet"], capture_output=True,
                       text=True, cwd=ROOT, timeout=seconds + 120)
    t1, c1 = time.monotonic(), cpu()
    st = cl.status()
    per = {w["id"]: w.get("served", 0) for w in st["workers"]}
    tok = st["metrics"].get("tokens_per_s", 0.0)
    done = st["gateway"]["counters"]["done"] - before["done"]
    out = {"wall_s": round(t1 - t0, 2), "gateway_cpu_s": round(c1 - c0, 3),
           "requests_done": done, "served_by": per, "tokens_per_s_window": round(tok, 1),
           "bench_rc": r.returncode}
    if tok:
        out["gateway_cpu_percent_per_1000_tok_s"] = round(100 * (c1 - c0) / (t1 - t0)
                                                          / tok * 1000, 2)
    return out


def bench_tok_s(cl: Cluster, clients: int, requests: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, "-m", "llmctl.tools.bench", "--target",
                        f"tcp://127.0.0.1:{cl.port}", "--clients", str(clients), "--requests",
                        str(requests), "--max-tokens", "64", "--temperature", "0", "--quiet",
                        "--json", f.name], capture_output=True, text=True, cwd=ROOT,
                       timeout=900, check=True)
        data = json.loads(Path(f.name).read_text())
    return data


def link_times(cl: Cluster) -> dict[str, float]:
    c = cl.client()
    try:
        for s in (1, 2):
            c.generate(s, prompt=f"Count from 1 to 500:\n1\n2\n{s}", max_tokens=400,
                       temperature=0.0)
        seen: dict[int, int] = {1: 0, 2: 0}
        while min(seen.values()) == 0:
            f = c.recv_frame()
            if f.type is FrameType.TOKEN:
                seen[f.stream] += 1
        cl.net.link(False)
        t_cut = time.monotonic()
        failed = None
        while failed is None:
            f = c.recv_frame()
            if f.type is FrameType.ERROR:
                failed = time.monotonic() - t_cut
        cl.net.link(True)
        t_back = time.monotonic()
        rejoin = cl.wait(cl.node_ready, 120)
        return {"link_loss_to_worker_failed_s": round(failed, 3),
                "link_return_to_node_ready_s": round(rejoin, 3),
                "liveness_bound_s": 2.0, "link_down_s": round(t_back - t_cut, 3)}
    finally:
        cl.net.link(True)
        c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="measure_cluster")
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--json", default=None)
    p.add_argument("--runs", type=int, default=3, help="link loss/return repetitions")
    args = p.parse_args(argv)
    net = Net()
    out: dict[str, Any] = {}
    try:
        cl = Cluster(net, args.model, "synthetic", 1, stamp=True)
        cl.start()
        try:
            out["added_latency"] = added_latency(cl, rounds=20, tokens=200)
        finally:
            cl.stop()
        print(json.dumps(out["added_latency"], indent=1), flush=True)
        cl = Cluster(net, args.model, "synthetic", 16, stamp=False)
        cl.start()
        try:
            out["gateway_cpu"] = gateway_cpu(cl, 10, 32)
        finally:
            cl.stop()
        print(json.dumps(out["gateway_cpu"], indent=1), flush=True)
        cl = Cluster(net, args.model, "llama", 1, stamp=False)
        cl.start(node=False)
        try:
            alone = bench_tok_s(cl, 2, 12)
            cl.start()
            both = bench_tok_s(cl, 2, 12)
            out["aggregate"] = {"head_alone": alone.get("points", alone),
                                "head_and_node": both.get("points", both)}
            print(json.dumps(out["aggregate"], indent=1)[:3000], flush=True)
            out["link"] = [link_times(cl) for _ in range(args.runs)]
            print(json.dumps(out["link"], indent=1), flush=True)
        finally:
            cl.stop()
    finally:
        net.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
