"""`llmctl models | load NAME | unload NAME`: the served models and their memory plan."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from llmctl.common import admin
from llmctl.common.config import Config
from llmctl.common.console import console
from llmctl.control.render import print_models
from llmctl.control.supervisor_client import EXIT_NOT_RUNNING, call, refused


def cmd_models(cfg: Config, args: argparse.Namespace) -> int:
    st = call(cfg, admin.Models())
    if not st:
        print(json.dumps({"running": False}) if args.json else "llmctl is not running.")
        return EXIT_NOT_RUNNING
    if args.json:
        print(json.dumps(st["models"], indent=2))
    else:
        print_models(st["models"], console())
    return 0


def _wait(cfg: Config, name: str, states: tuple[str, ...], timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        st = call(cfg, admin.Models())
        if st is None:
            return None
        row = next((m for m in st["models"] if m["name"] == name), None)
        if row is None or row["state"] in states:
            return row
        if row["state"] == "unloaded" and row.get("error"):
            return row
        time.sleep(0.2)
    return row


def _change(cfg: Config, args: argparse.Namespace, msg: Any, want: str, verb: str,
            timeout: float) -> int:
    """Ask the supervisor to load or unload ``args.name`` and wait for state ``want``."""
    st = call(cfg, msg)
    if (code := refused(st)) is not None:
        return code
    t0 = time.monotonic()
    row = _wait(cfg, args.name, (want,), timeout)
    if row is None or row["state"] != want:
        why = (row or {}).get("error") or f"state {(row or {}).get('state')}"
        print(f"error: model {args.name} did not {verb}: {why}", file=sys.stderr)
        return 1
    print(f"model {args.name} {want} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_load(cfg: Config, args: argparse.Namespace) -> int:
    return _change(cfg, args, admin.Load(model=args.name), "loaded", "load",
                   cfg.workers.ready_timeout_s + 2 * cfg.control.drain_timeout_s)


def cmd_unload(cfg: Config, args: argparse.Namespace) -> int:
    return _change(cfg, args, admin.Unload(model=args.name), "unloaded", "unload",
                   cfg.control.drain_timeout_s + 2 * cfg.control.stop_timeout_s + 5)


def check_models(cfg: Config) -> int:
    """`llmctl check` of [[models]]: each model's plan figure against the budget."""
    from llmctl.control.gpu import ModelInfoError
    from llmctl.control.models import check_plan, memory_plan
    try:
        needs, budget, kind = memory_plan(cfg)
    except ModelInfoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = "[gpu] vram_budget_mb" if kind == "vram" else "[host] ram_budget_mb"
    print(f"memory plan ({kind}, the GGUF estimate per worker x workers) against {where} = "
          + (f"{budget:.0f} MiB" if budget else "0 (no budget)"))
    for e in cfg.served:
        n = needs.get(e.name)
        print(f"  {e.name:<24} {e.load:<9} {e.workers} worker(s) x {e.slots} slot(s), n_ctx "
              f"{e.n_ctx}, KV {e.cache_type_k}/{e.cache_type_v}: "
              + (f"{n:,.1f} MiB" if n is not None else "unknown"))
    why = check_plan(cfg, needs, budget, kind)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    print("fits: the always models together and every model alone are within the budget"
          if budget else "nothing is enforced")
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands."""
    p = sub.add_parser("models", parents=[common],
                       help="the served models: state, workers, memory plan and measured")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("load", parents=[common],
                       help="load a model now (evicting the least recently used idle one)")
    p.add_argument("name")
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("unload", parents=[common], help="drain and unload a model")
    p.add_argument("name")
    p.set_defaults(func=cmd_unload)
