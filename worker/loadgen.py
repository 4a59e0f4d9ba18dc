"""Closed-loop load on the batching engine in this process, no gateway (``llmctl bench --engine``).

    python -m llmctl.worker.loadgen --model M.gguf --clients 8 --warmup 2 < requests.jsonl

stdin: one request a line, the fields of a GENERATE (``prompt`` or ``messages``,
``max_tokens``, ``temperature``, ``seed``...), validated as the gateway does; the first
``--warmup`` run first (to their ends) and are not reported. ``--clients`` closed-loop clients each take
the next request when their last one ended; a request waits for a free slot (FIFO).
stdout: one JSON object a line per measured request, as it ends: ``index`` (its line
after the warm-up ones), ``t_start`` (the client sent it), ``piece_times`` (each piece of text
out of a step), ``t_end`` (``time.perf_counter`` seconds), ``completion_tokens``,
``prompt_tokens``, ``finish_reason``, or ``error`` and ``message``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from typing import Any, Callable

from llmctl.common.config import GenerationConfig, ModelConfig, WorkersConfig
from llmctl.common.errors import LlmctlError
from llmctl.common.request import validate
from llmctl.worker.batch import BatchEngine
from llmctl.worker.engine import ModelLoadError

GENERATION = GenerationConfig()       # what a request leaves out, as the gateway's defaults

now = time.perf_counter


def run(engine: BatchEngine, requests: list[tuple[int, dict[str, Any]]], clients: int,
        out: Callable[[dict[str, Any]], None]) -> None:
    """Run ``requests`` ((index, GENERATE fields)) with ``clients`` closed-loop clients."""
    todo = deque(requests)
    queued: deque[dict[str, Any]] = deque()        # sent, waiting for a slot
    running: dict[int, dict[str, Any]] = {}        # rid -> its record

    def send() -> None:
        if todo:
            index, fields = todo.popleft()
            queued.append({"index": index, "t_start": now(), "piece_times": [], "fields": fields})

    def end(rec: dict[str, Any], **result: Any) -> None:
        rec.pop("fields", None)
        out({**rec, **result, "t_end": now()})
        send()                                     # the client's next request

    for _ in range(clients):
        send()
    while queued or running:
        while queued and engine.free_slots:
            rec = queued.popleft()
            try:
                seq = engine.prepare(rec["index"], validate(rec["fields"], GENERATION))
                engine.start(seq)
            except LlmctlError as exc:
                end(rec, error=exc.code.value, message=exc.message)
                continue
            running[seq.rid] = rec
        for ev in engine.step():
            rec = running[ev.rid]
            if ev.text:
                rec["piece_times"].append(now())
            if ev.done is not None:
                del running[ev.rid]
                end(rec, completion_tokens=ev.done.completion_tokens,
                    prompt_tokens=ev.done.prompt_tokens, finish_reason=ev.done.finish_reason)
            elif ev.error is not None:
                del running[ev.rid]
                err = ev.error.to_dict() if isinstance(ev.error, LlmctlError) else {}
                end(rec, error=err.get("code", "internal"), message=str(ev.error))


def main(argv: list[str] | None = None) -> int:
    model, workers = ModelConfig(), WorkersConfig()
    ap = argparse.ArgumentParser(prog="python -m llmctl.worker.loadgen",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=model.path)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, help="requests run first, not reported")
    ap.add_argument("--slots", type=int, default=None, help="default: --clients")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--n-ctx", type=int, default=model.n_ctx, help="per slot")
    ap.add_argument("--n-batch", type=int, default=model.n_batch)
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="default: 0, the CPU")
    ap.add_argument("--kv-unified", action="store_true", help="one KV buffer for all slots")
    args = ap.parse_args(argv)
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    try:
        engine = BatchEngine(args.model, args.n_ctx, args.n_gpu_layers,
                             args.threads or len(os.sched_getaffinity(0)), args.n_batch, slots=args.slots or args.clients,
                             kv_unified=args.kv_unified,
                             prompt_cache=workers.prompt_cache,
                             prompt_cache_bytes=workers.prompt_cache_mib << 20)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    run(engine, list(enumerate(requests[:args.warmup])), args.clients, lambda rec: None)
    run(engine, list(enumerate(requests[args.warmup:])), args.clients,
        lambda rec: print(json.dumps(rec), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
