"""Measure the supervisor's reaction times on a real service (a benchmark, not a test).

    python -m llmctl.tools.measure_failover [--runs 5]

Starts llmctl on free ports (1 worker, heartbeat 0.5 s x liveness 4) and, per run:
* kill -9 the worker mid-stream: time until the client has ERROR worker_failed, and
  from the kill until the replacement is READY;
* SIGSTOP the worker: time until the supervisor has killed it (declared dead).
Prints mean/min/max of each and writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

from llmctl.common.protocol import FrameType


def main(argv: list[str] | None = None) -> int:
    from tests.service import Service  # the same harness as the integration tests

    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.measure_failover")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    svc = Service(control={"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "max_restarts": 100,
                           "restart_window_s": 10.0})
    r = svc.start()
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        return 1
    out: dict[str, list[float]] = {"kill_to_worker_failed_ms": [], "kill_to_ready_ms": [],
                                   "stop_to_killed_ms": []}

    def worker() -> dict:
        return svc.status()["workers"][0]

    def wait_ready(old_pid: int) -> None:
        while not (worker()["pid"] not in (None, old_pid) and worker()["state"] == "ready"):
            time.sleep(0.01)

    try:
        for _ in range(args.runs):
            pid = worker()["pid"]
            with svc.client() as c:
                c.generate(1, prompt="Once upon a time", max_tokens=2000, temperature=0.0)
                assert c.recv_frame().type is FrameType.TOKEN
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                while True:
                    f = c.recv_frame()
                    if f.type is FrameType.ERROR:
                        assert json.loads(f.payload)["code"] == "worker_failed"
                        break
                out["kill_to_worker_failed_ms"].append((time.monotonic() - t0) * 1000)
            wait_ready(pid)
            out["kill_to_ready_ms"].append((time.monotonic() - t0) * 1000)

            pid = worker()["pid"]
            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            while worker()["pid"] == pid:
                time.sleep(0.01)
            out["stop_to_killed_ms"].append((time.monotonic() - t0) * 1000)
            wait_ready(pid)
    finally:
        svc.stop()
    for k, v in out.items():
        print(f"{k:26} mean {statistics.mean(v):8.1f}  min {min(v):8.1f}  max {max(v):8.1f}"
              f"  (n={len(v)})")
    print("liveness x interval = 4 x 0.5 s = 2000 ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
