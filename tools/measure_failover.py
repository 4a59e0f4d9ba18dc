"""Measure the supervisor's reaction times on a running service (a benchmark, not a test).

    python -m llmctl.tools.measure_failover -c config.toml [--runs 5] [--json PATH]

Against an idle llmctl started with ``config.toml`` (its pids from ``llmctl status --json``;
a short heartbeat and backoff make the figures easy to read, e.g. ``[workers]
heartbeat_interval_s = 0.5``, ``liveness = 4``, ``[control] backoff_initial_s = 0.1``), per run:

* kill -9 the worker serving a stream, mid-stream: time until the client has ERROR
  ``worker_failed``, and from the kill until the replacement is READY;
* SIGSTOP that worker: time until the supervisor has killed it (declared dead).

Prints p50/p99 (nearest rank, ``common.stats``), min and max of each; ``--json`` writes
every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from llmctl.common.sync_client import Client
from llmctl.common.config import ConfigError, load
from llmctl.common.protocol import FrameType
from llmctl.common.stats import percentile
from llmctl.tools.service_status import gateway_address, status

POLL_S = 0.01


def worker(config: str, wid: str) -> dict[str, Any]:
    st = status(config)
    return next((w for w in st.get("workers", []) if w["id"] == wid), {"pid": None, "state": "?"})


def wait_ready(config: str, wid: str, old_pid: int, timeout: float = 300.0) -> None:
    """Until worker ``wid`` runs as another process than ``old_pid`` and is ready."""
    deadline = time.monotonic() + timeout
    while True:
        w = worker(config, wid)
        if w["pid"] not in (None, old_pid) and w["state"] == "ready":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{wid} was not ready again within {timeout:g}s: {w}")
        time.sleep(POLL_S)


def serving_worker(config: str) -> dict[str, Any]:
    """The worker with a stream in flight (the service is otherwise idle)."""
    busy = [w for w in status(config).get("workers", []) if w.get("inflight")]
    if len(busy) != 1:
        raise RuntimeError(f"expected one busy worker, found {len(busy)}: is the service idle?")
    return busy[0]


def one_run(config: str, host: str, port: int, token: str | None,
            out: dict[str, list[float]]) -> None:
    with Client(host, port, timeout=60.0) as c:
        c.hello(token)
        c.generate(1, prompt="Once upon a time", max_tokens=2000, temperature=0.0)
        f = c.recv_frame()
        if f.type is not FrameType.TOKEN:
            raise RuntimeError(f"expected a TOKEN first, got {f.type.name}: {f.payload[:200]!r}")
        w = serving_worker(config)
        t0 = time.monotonic()
        os.kill(w["pid"], signal.SIGKILL)
        end = c.collect({1})[1]
        t_failed = time.monotonic()
        if end.error is None or end.error.get("code") != "worker_failed":
            raise RuntimeError(f"expected worker_failed, got {end.done or end.error}")
        out["kill_to_worker_failed_ms"].append((t_failed - t0) * 1000)
    wait_ready(config, w["id"], w["pid"])
    out["kill_to_ready_ms"].append((time.monotonic() - t0) * 1000)

    pid = worker(config, w["id"])["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    while worker(config, w["id"])["pid"] == pid:
        time.sleep(POLL_S)
    out["stop_to_killed_ms"].append((time.monotonic() - t0) * 1000)
    wait_ready(config, w["id"], pid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.measure_failover",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=os.environ.get("LLMCTL_CONFIG", "config.toml"),
                    help="config of the running service (its workers are the victims)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    st = status(args.config)
    if not st.get("running"):
        print(f"error: llmctl is not running with {args.config}", file=sys.stderr)
        return 1
    host, port = gateway_address(st)
    out: dict[str, list[float]] = {"kill_to_worker_failed_ms": [], "kill_to_ready_ms": [],
                                   "stop_to_killed_ms": []}
    try:
        for _ in range(args.runs):
            one_run(args.config, host, port, cfg.gateway.token or None, out)
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for k, v in out.items():
        print(f"{k:26} p50 {percentile(v, 50):8.1f}  p99 {percentile(v, 99):8.1f}  "
              f"min {min(v):8.1f}  max {max(v):8.1f}  (n={len(v)})")
    w = cfg.workers
    print(f"liveness x interval = {w.liveness} x {w.heartbeat_interval_s:g} s = "
          f"{w.liveness * w.heartbeat_interval_s * 1000:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
