"""``llmctl bench --embeddings N[,N...]``: embeddings per second of an OpenAI-compatible
``POST /v1/embeddings`` (an ``http://HOST:PORT/v1`` target).

For each input size N and each ``--clients`` count: that many clients, back to back, each
request embedding N texts (the prompts' texts, cycled) for ``--requests`` requests after
``--warmup``.  Reported: requests/s, embeddings/s (inputs/s), input tokens/s and the
latency p50/p99 (nearest rank, ``common/stats.py``).
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from llmctl.common.client import now
from llmctl.common.stats import percentile


def texts_of(prompts: list[dict[str, Any]]) -> list[str]:
    out = []
    for p in prompts:
        out.append(p["prompt"] if "prompt" in p else " ".join(m["content"] for m in p["messages"]))
    return out


async def _point(url: str, key: str | None, texts: list[str], size: int, clients: int,
                 requests: int, warmup: int, timeout: float) -> dict[str, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    lat: list[float] = []
    tokens = errors = 0
    counter = iter(range(requests + warmup))

    async def client(session: Any) -> None:
        nonlocal tokens, errors
        for i in counter:
            batch = [texts[(i * size + j) % len(texts)] for j in range(size)]
            t0 = now()
            async with session.post(f"{url}/embeddings", json={"input": batch},
                                    headers=headers) as resp:
                body = await resp.json(content_type=None)
            if i < warmup:
                continue
            if resp.status != 200 or len(body.get("data", [])) != size:
                errors += 1
                continue
            lat.append(now() - t0)
            tokens += body["usage"]["prompt_tokens"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        start = now()
        await asyncio.gather(*(client(s) for _ in range(clients)))
        wall = now() - start
    ok = len(lat)
    # warm-up requests ran inside the wall time too: rates count every request sent
    n_all = ok + errors + warmup
    return {"size": size, "clients": clients, "ok": ok, "errors": errors,
            "requests_per_s": round(n_all / wall, 2),
            "embeddings_per_s": round(n_all * size / wall, 1),
            "tokens_per_s": round(tokens / wall * n_all / max(ok, 1), 1),
            "latency_p50_ms": round(percentile(lat, 50) * 1000, 1),
            "latency_p99_ms": round(percentile(lat, 99) * 1000, 1)}


def run_embeddings(args: Any) -> int:
    url = args.target.rstrip("/")
    if not url.startswith("http://"):
        print("error: --embeddings needs an http://HOST:PORT/v1 target", file=sys.stderr)
        return 2
    texts = texts_of(args.prompts_list)
    points = []
    for size in args.embeddings:
        for clients in args.clients:
            p = asyncio.run(_point(url, args.api_key, texts, size, clients, args.requests,
                                   args.warmup, args.timeout))
            points.append(p)
            print(f"inputs {size:4d}  clients {clients:3d}  {p['requests_per_s']:8.2f} req/s  "
                  f"{p['embeddings_per_s']:9.1f} embeddings/s  {p['tokens_per_s']:9.1f} tok/s  "
                  f"p50 {p['latency_p50_ms']:8.1f} ms  p99 {p['latency_p99_ms']:8.1f} ms  "
                  f"errors {p['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target": url, "points": points}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(p["ok"] for p in points) else 1
