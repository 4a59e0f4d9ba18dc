"""``llmctl bench --engine MODEL.gguf``: the batching engine driven directly, no gateway.

The tools never import the worker package; the engine runs in a worker-side entry point,
``python -m llmctl.worker.loadgen``, started per point: it reads the point's requests
(warm-up first) as JSON lines on stdin, runs them with N closed-loop clients on one
``BatchEngine`` in its own process and writes one record a line per measured request.
Those are the bench's ``RequestRecord``s, summarised like any other target's.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, Callable

from llmctl.tools.bench_load import Workload
from llmctl.tools.bench_stats import RequestRecord
from llmctl.tools.bench_targets import Target

ENTRY = "llmctl.worker.loadgen"


class EngineTarget(Target):
    """Not a per-request target: ``closed_loop`` runs a whole point in the engine's process."""

    def __init__(self, model: str, slots: int, threads: int | None = None,
                 n_ctx: int | None = None, n_batch: int | None = None,
                 n_gpu_layers: int | None = None, kv_unified: bool = False) -> None:
        self.url = f"engine:{model}"
        self.options = {"--model": model, "--slots": slots, "--threads": threads,
                        "--n-ctx": n_ctx, "--n-batch": n_batch, "--n-gpu-layers": n_gpu_layers}
        self.kv_unified = kv_unified
        self.info: dict[str, Any] = {
            "protocol": "in-process engine", "server": f"python -m {ENTRY}",
            "model": os.path.basename(model), "slots": slots, "kv_unified": kv_unified,
            **{k[2:].replace("-", "_"): v for k, v in self.options.items()
               if v is not None and k not in ("--model", "--slots")}}

    def command(self, clients: int, warmup: int) -> list[str]:
        cmd = [sys.executable, "-m", ENTRY, "--clients", str(clients), "--warmup", str(warmup)]
        for flag, value in self.options.items():
            if value is not None:
                cmd += [flag, str(value)]
        return cmd + (["--kv-unified"] if self.kv_unified else [])

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        raise NotImplementedError("the engine runs whole points: use closed_loop")

    async def closed_loop(self, work: Workload, clients: int, requests: int, warmup: int,
                          on_done: Callable[[RequestRecord], None]) -> list[RequestRecord]:
        """One point: ``warmup`` then ``requests`` requests, ``clients`` at a time."""
        specs = [work.spec(10_000 + i) for i in range(warmup)] + [work.spec(i) for i in range(requests)]
        proc = await asyncio.create_subprocess_exec(
            *self.command(clients, warmup), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdin and proc.stdout and proc.stderr
        errors = asyncio.create_task(proc.stderr.read())
        records: list[RequestRecord] = []
        try:
            proc.stdin.write("".join(json.dumps(s) + "\n" for s in specs).encode())
            await proc.stdin.drain()
            proc.stdin.close()
            while line := await proc.stdout.readline():
                rec = RequestRecord.from_dict(json.loads(line))
                records.append(rec)
                on_done(rec)
            rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stderr = (await errors).decode(errors="replace").strip()
        if rc != 0 or len(records) != requests:
            raise RuntimeError(f"{ENTRY} exited {rc} after {len(records)} of {requests} "
                               f"requests: {stderr[-2000:]}")
        return sorted(records, key=lambda r: r.index)
