"""Closed-loop load: N clients, each sending its next request when the last ended.

    python -m llmctl.tools.closed_loop --port 8080 --clients 8 --requests 3 --max-tokens 64
    python -m llmctl.tools.closed_loop --engine --slots 8 --clients 8 --requests 3   # in-process

Prints aggregate completion tokens per second over the whole run (wall clock).  Every
request is greedy on a distinct prompt, so the prompt cache only shares the template.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

TOPICS = ["a lighthouse", "a dragon", "the sea", "a robot", "winter", "a garden", "a city",
          "a cat", "the moon", "a violin", "a storm", "a library"]


def request(i: int, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Write a long story about "
                                                     f"{TOPICS[i % len(TOPICS)]} (#{i})."}],
            "max_tokens": max_tokens, "temperature": 0.0}


def over_tcp(args: argparse.Namespace) -> tuple[int, float]:
    from llmctl.common.client import Client
    tokens = [0] * args.clients

    def client(k: int) -> None:
        with Client(args.host, args.port, timeout=300) as c:
            c.hello()
            for r in range(args.requests):
                res = c.complete(1, **request(k * 1000 + r, args.max_tokens))
                assert res.done is not None, res.error
                tokens[k] += res.done["completion_tokens"]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens), time.monotonic() - t0


def in_process(args: argparse.Namespace) -> tuple[int, float]:
    from llmctl.worker.batch import BatchEngine
    e = BatchEngine(args.model, args.n_ctx, 0, args.threads, args.n_batch, slots=args.slots,
                    kv_unified=args.kv_unified)
    todo = [(k, r) for r in range(args.requests) for k in range(args.clients)]
    running: set[int] = set()   # clients with a request in the engine
    tokens, rid = 0, 0
    t0 = time.monotonic()
    while todo or e.running:
        for k, r in list(todo):
            if k not in running and e.free_slots:
                todo.remove((k, r))
                rid += 1
                seq = e.prepare(rid, request(k * 1000 + r, args.max_tokens))
                seq.client = k
                e.start(seq)
                running.add(k)
        seqs = dict(e.running)
        for ev in e.step():
            if ev.done is not None:
                tokens += ev.done["completion_tokens"]
                running.discard(seqs[ev.rid].client)
    return tokens, time.monotonic() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--engine", action="store_true", help="drive a BatchEngine in-process")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--n-batch", type=int, default=256)
    p.add_argument("--kv-unified", action="store_true", help="one shared KV buffer (--engine)")
    args = p.parse_args()
    tokens, wall = in_process(args) if args.engine else over_tcp(args)
    print(json.dumps({"clients": args.clients, "slots": args.slots if args.engine else None,
                      "tokens": tokens, "wall_s": round(wall, 2),
                      "tok_per_s": round(tokens / wall, 1)}))


if __name__ == "__main__":
    main()
