"""The workload of the load generator (tools/bench.py) and the two ways of offering it.

* ``Workload``: request i is prompt i mod len(prompts) (the built-in ten, or a JSONL file
  read by ``common/prompts.py``) with the run's generation settings.
* ``closed_loop``: N clients, each sending its next request when its last one ended.
* ``open_loop``: Poisson arrivals at a rate, each sent at its time whatever is in flight.
"""
from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any, Callable

from llmctl.common.client import now
from llmctl.tools.bench_stats import OVERLOADED, RequestRecord
from llmctl.tools.bench_targets import Target

BUILTIN_PROMPTS: list[dict[str, Any]] = [
    {"prompt": "Once upon a time, in a small village by the sea,"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "The three most important ideas in computer science are"},
    {"messages": [{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Explain how a hash table works."}]},
    {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"messages": [{"role": "user", "content": "Write a haiku about autumn leaves."}]},
    {"prompt": "Recipe for a simple tomato soup. Ingredients:"},
    {"messages": [{"role": "user", "content":
                   "Summarise the plot of Romeo and Juliet in a few sentences, then list its "
                   "main characters and say in one line what each of them wants."}]},
    {"prompt": "Q: Why is the sky blue?\nA:"},
    {"messages": [{"role": "user", "content": "Give me five tips to sleep better."}]},
]


# ---- workload ------------------------------------------------------------------------------

class Workload:
    """Request i of a point: prompt i mod len(prompts), with the run's generation settings."""

    def __init__(self, prompts: list[dict[str, Any]], max_tokens: int, temperature: float | None,
                 seed: int | None = None, ignore_eos: bool = False) -> None:
        self.prompts, self.max_tokens, self.temperature = prompts, max_tokens, temperature
        self.seed, self.ignore_eos = seed, ignore_eos

    def spec(self, i: int) -> dict[str, Any]:
        spec = dict(self.prompts[i % len(self.prompts)])
        spec["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            spec["temperature"] = self.temperature
        if self.seed is not None:
            spec["seed"] = (self.seed + i) & 0xFFFFFFFF
        if self.ignore_eos:
            spec["ignore_eos"] = True
        return spec


# ---- running a point --------------------------------------------------------------------

async def closed_loop(target: Target, work: Workload, clients: int, requests: int | None,
                      duration: float | None, on_done: Callable[[RequestRecord], None],
                      first_index: int = 0, ramp_s: float = 0.0) -> list[RequestRecord]:
    """``clients`` concurrent senders, back to back, until ``requests`` or ``duration``.
    ``ramp_s``: client k sends its first request k/clients of it after the first one, so
    that clients whose requests take alike long do not start, end and start again in
    step (a herd of arrivals every request's length) but spread over it, as independent
    users do; 0 starts them all at once."""
    counter = itertools.count()
    records: list[RequestRecord] = []
    deadline = now() + duration if duration else None

    async def client(k: int) -> None:
        if ramp_s > 0 and k:
            await asyncio.sleep(ramp_s * k / clients)
        while True:
            if deadline is not None and now() >= deadline:
                return
            i = next(counter)
            if requests is not None and i >= requests:
                return
            rec = await target.request(i, work.spec(first_index + i))
            records.append(rec)
            on_done(rec)
            if rec.error == OVERLOADED:   # a polite client backs off as it is told to
                await asyncio.sleep(min((rec.retry_after_ms or 100) / 1000, 1.0))
            elif rec.error in ("connect_failed", "not_ready"):
                await asyncio.sleep(0.1 if rec.error == "connect_failed" else 0.25)

    await asyncio.gather(*(client(k) for k in range(clients)))
    return sorted(records, key=lambda r: r.index)


async def open_loop(target: Target, work: Workload, rate: float, requests: int | None,
                    duration: float | None, on_done: Callable[[RequestRecord], None],
                    seed: int = 0) -> list[RequestRecord]:
    """Poisson arrivals at ``rate``/s, each sent at its scheduled time whatever is in flight."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    tasks = []

    async def one(i: int) -> None:
        rec = await target.request(i, work.spec(i))
        records.append(rec)
        on_done(rec)

    t0 = now()
    t_next = t0
    for i in itertools.count():
        if requests is not None and i >= requests:
            break
        if duration is not None and t_next - t0 >= duration:
            break
        delay = t_next - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        t_next += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.index)
