"""Measure on-demand loading and eviction on a running service (a benchmark, not a test).

    python -m llmctl.tools.measure_models -c two-models.toml [--a A] [--b B] [--runs 3]
                                          [--start-config one-model.toml] [--json PATH]

``two-models.toml`` serves two on-demand ``[[models]]`` (by default the first two) under a
budget that holds one of them but not both.  Per run, from the client's side (GENERATE
sent -> first TOKEN, ``max_tokens`` 8, greedy):

* **cold A**: nothing loaded, a request for A (the supervisor starts A's worker, which
  loads the GGUF and warms up; then A answers);
* **warm A**: the same request again, A loaded;
* **evict -> B**: A loaded and idle, a request for B: A is drained and stopped first,
  then B loads (``evict`` = this minus **cold B**);
* **cold B**: nothing loaded, a request for B;
* ``llmctl unload`` of a loaded model (drain + stop), as the CLI times it.

With ``--start-config`` it also times ``llmctl start`` (command to return: gateway up and
a worker READY) of that (one-model) config, then ``llmctl stop``, ``--runs`` times.
Prints p50 (nearest rank, ``common.stats``), min and max of each figure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from llmctl.common.sync_client import Client
from llmctl.common.protocol import FrameType
from llmctl.common.stats import percentile
from llmctl.tools.service_status import gateway_address, status


def llmctl(config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl.control", *args, "-c", config],
                          capture_output=True, text=True, timeout=600)


def ttft(host: str, port: int, model: str) -> float:
    """ms from GENERATE to the first TOKEN; raises if the request does not succeed."""
    with Client(host, port, timeout=300) as c:
        c.hello()
        t0 = time.perf_counter()
        c.generate(1, prompt="Once upon a time", max_tokens=8, temperature=0.0, model=model)
        first = None
        while True:
            f = c.recv_frame()
            if f.type is FrameType.TOKEN and first is None:
                first = time.perf_counter()
            elif f.type is FrameType.DONE:
                break
            elif f.type is FrameType.ERROR:
                raise RuntimeError(f"{model}: {f.payload.decode()}")
    return ((first or time.perf_counter()) - t0) * 1000


def unload_all(config: str, names: list[str]) -> None:
    for n in names:
        r = llmctl(config, "unload", n)
        if r.returncode != 0:
            raise RuntimeError(r.stderr or r.stdout)


def unload_ms(config: str, name: str) -> float:
    t0 = time.perf_counter()
    r = llmctl(config, "unload", name)
    if r.returncode != 0:
        raise RuntimeError(r.stderr or r.stdout)
    return (time.perf_counter() - t0) * 1000


def one_run(config: str, host: str, port: int, a: str, b: str) -> dict[str, float]:
    unload_all(config, [a, b])
    out = {"cold_a_ms": ttft(host, port, a), "warm_a_ms": ttft(host, port, a),
           "evict_to_b_ms": ttft(host, port, b)}
    out["unload_ms"] = unload_ms(config, b)
    out["cold_b_ms"] = ttft(host, port, b)
    out["evict_ms"] = out["evict_to_b_ms"] - out["cold_b_ms"]
    return out


def start_ms(config: str) -> float:
    t0 = time.perf_counter()
    r = llmctl(config, "start")
    took = (time.perf_counter() - t0) * 1000
    llmctl(config, "stop")
    if r.returncode != 0:
        raise RuntimeError(r.stderr or r.stdout)
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.measure_models")
    ap.add_argument("-c", "--config", required=True, help="the running two-model service")
    ap.add_argument("--a", default=None, help="model A (default: the first served)")
    ap.add_argument("--b", default=None, help="model B (default: the second)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--start-config", default=None, help="a config to time `llmctl start` of")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    st = status(args.config)
    if not st.get("running"):
        print(f"llmctl is not running with {args.config}", file=sys.stderr)
        return 1
    names = [m["name"] for m in st["models"]]
    a, b = args.a or names[0], args.b or names[1]
    host, port = gateway_address(st)
    runs = [one_run(args.config, host, port, a, b) for _ in range(args.runs)]
    result: dict[str, Any] = {"a": a, "b": b, "runs": runs}
    if args.start_config:
        result["start_ms"] = [start_ms(args.start_config) for _ in range(args.runs)]
    figures = {k: [r[k] for r in runs] for k in runs[0]}
    if "start_ms" in result:
        figures["llmctl_start_ms"] = result["start_ms"]
    print(f"{'figure':<16} {'p50':>8} {'min':>8} {'max':>8}   (ms, {args.runs} runs; A={a}, B={b})")
    for k, v in figures.items():
        print(f"{k:<16} {percentile(v, 50):>8.0f} {min(v):>8.0f} {max(v):>8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
