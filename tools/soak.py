"""Chaos soak: load on a running llmctl while its workers are killed (a benchmark, not a test).

    python -m llmctl.tools.soak -c config.toml --duration 180 --clients 4 --kill-every 5-15
    python -m llmctl.tools.soak -c config.toml --duration 180 --stop-fraction 0.3 --json soak.json

While ``--clients`` closed-loop clients send requests over the wire protocol, a worker
chosen at random is sent SIGKILL (as an OOM killer or an operator might) every
``--kill-every`` seconds (uniform in the range), or, for ``--stop-fraction`` of the
actions, SIGSTOP (a hung worker, which the gateway must declare dead and the
supervisor kill).  At the end the load stops and the soak waits until every worker is
serving again.

It counts what a user would: requests sent, done, errors by code, **lost** (no DONE or
ERROR within the client's timeout, or the connection closed under the request) and
**double** (a second DONE/ERROR for a stream that had ended), the actions taken, the
workers' restarts and the time from the last action until all were ready again, and the
end-to-end latency of the requests done (nearest-rank p50/p99, ``common.stats``).
Exit status 0 when nothing was lost or doubled and every worker serves at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from llmctl.common.stats import percentile
from llmctl.tools.bench_load import BUILTIN_PROMPTS, Workload, closed_loop
from llmctl.tools.bench_stats import RequestRecord
from llmctl.tools.bench_targets import TcpTarget
from llmctl.tools.service_status import gateway_address, serving, status

LOST = ("client_timeout", "connection_closed", "connection_error", "connect_failed")


async def chaos(config: str, stop: asyncio.Event, every: tuple[float, float],
                stop_fraction: float, rng: random.Random, log: list[dict[str, Any]]) -> None:
    """Kill (or stop) a random live worker every ``every`` seconds until ``stop``."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*every))
            return
        except asyncio.TimeoutError:
            pass
        st = await asyncio.to_thread(status, config)
        live = [w for w in st.get("workers", []) if w.get("pid")]
        if not live:
            log.append({"t": time.time(), "action": "none", "why": "no live worker"})
            continue
        w = rng.choice(live)
        sig = signal.SIGSTOP if rng.random() < stop_fraction else signal.SIGKILL
        try:
            os.kill(w["pid"], sig)
        except ProcessLookupError:
            continue
        log.append({"t": time.time(), "action": sig.name, "worker": w["id"], "pid": w["pid"],
                    "state": w["state"]})
        print(f"  {time.strftime('%H:%M:%S')} {sig.name} {w['id']} (pid {w['pid']}, "
              f"{w['state']})", flush=True)


async def soak(config: str, target: str, duration: float, clients: int, every: tuple[float, float],
               stop_fraction: float, max_tokens: int, recover_timeout: float,
               seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    before = await asyncio.to_thread(status, config)
    if not before.get("running"):
        raise SystemExit(f"llmctl is not running with {config}")
    host, port = gateway_address(before)
    tgt = TcpTarget(target or f"tcp://{host}:{port}", timeout=120.0)
    await tgt.open()
    work = Workload(BUILTIN_PROMPTS, max_tokens=max_tokens, temperature=0.7, seed=seed)
    stop = asyncio.Event()
    actions: list[dict[str, Any]] = []
    chaos_task = asyncio.create_task(chaos(config, stop, every, stop_fraction, rng, actions))
    t0 = time.monotonic()
    try:
        records = await closed_loop(tgt, work, clients, None, duration, lambda r: None)
    finally:
        stop.set()
        await chaos_task
    t_load = time.monotonic() - t0
    doubles = tgt.doubles()
    await tgt.close()
    # Every worker serves again: give the backoff and a model load their time.
    t_last = actions[-1]["t"] if actions else time.time()
    deadline = time.monotonic() + recover_timeout
    after = await asyncio.to_thread(status, config)
    while not serving(after) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        after = await asyncio.to_thread(status, config)
    recovered = serving(after)
    return report(records, doubles, actions, before, after, recovered,
                  time.time() - t_last if recovered else None, t_load)


def report(records: list[RequestRecord], doubles: int, actions: list[dict[str, Any]],
           before: dict[str, Any], after: dict[str, Any], recovered: bool,
           recovery_s: float | None, t_load: float) -> dict[str, Any]:
    errors = Counter(r.error for r in records if r.error)
    lost = sum(n for code, n in errors.items() if code in LOST)
    e2e = [r.e2e * 1000 for r in records if r.ok and r.e2e is not None]
    return {
        "duration_s": round(t_load, 1), "sent": len(records),
        "done": sum(1 for r in records if r.ok),
        "done_e2e_ms": {q: round(percentile(e2e, int(q[1:])), 1) if e2e else None
                        for q in ("p50", "p99")},
        "errors": dict(sorted((k, v) for k, v in errors.items() if k not in LOST)),
        "lost": lost, "lost_by_kind": {k: v for k, v in errors.items() if k in LOST},
        "double": doubles,
        "actions": Counter(a["action"] for a in actions),
        "restarts": {w["id"]: w["restarts"] for w in after.get("workers", [])},
        "fatal": [w["id"] for w in after.get("workers", []) if w["state"] == "fatal"],
        "final_states": {w["id"]: w["state"] for w in after.get("workers", [])},
        "all_serving_at_end": recovered,
        "recovery_s_after_last_action": None if recovery_s is None else round(recovery_s, 1),
        "workers_at_start": len(before.get("workers", [])),
        "action_log": actions,
    }


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    a, b = float(lo), float(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected SECONDS or LO-HI, got {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.tools.soak", description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=os.environ.get("LLMCTL_CONFIG", "config.toml"),
                    help="config of the running service (its workers are the victims)")
    ap.add_argument("--target", default=None, help="tcp://HOST:PORT (default: the gateway's)")
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load and chaos")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--kill-every", type=_range, default=(5.0, 15.0), metavar="LO-HI")
    ap.add_argument("--stop-fraction", type=float, default=0.0,
                    help="share of actions that SIGSTOP instead of SIGKILL")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--recover-timeout", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    print(f"soak: {args.duration:g}s, {args.clients} clients, an action every "
          f"{args.kill_every[0]:g}-{args.kill_every[1]:g}s "
          f"({args.stop_fraction:.0%} SIGSTOP)", flush=True)
    rep = asyncio.run(soak(args.config, args.target, args.duration, args.clients,
                           args.kill_every, args.stop_fraction, args.max_tokens,
                           args.recover_timeout, args.seed))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    brief = {k: v for k, v in rep.items() if k != "action_log"}
    print(json.dumps(brief, indent=2))
    ok = rep["lost"] == 0 and rep["double"] == 0 and rep["all_serving_at_end"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
