"""KV cache element types measured: memory, speed and greedy agreement with f16.

    python -m llmctl.tools.kv_cache_measure [--model M.gguf] [--n-ctx 2048 8192]
        [--types f16 q8_0 q4_0] [--threads 2] [--max-tokens 32] [--n-gpu-layers 0]
        [--json PATH]

For every (cache type, n_ctx) a fresh process loads the model with that type for K and V
and flash attention on (a quantized V cache needs it), and reports:

* **KV MiB, llama.cpp**: the ``KV buffer size`` lines of llama.cpp's load log (CPU or CUDA);
* **KV MiB, plan**: the ``KV cache`` term of ``llmctl check`` for the same [model] keys;
* **RSS MiB**: the process's resident memory with the context made and the prompts run,
  and its difference to the f16 run of the same n_ctx beside the plan's difference;
* **tok/s**: greedy decoding over the prompt set (prefill excluded);
* **agreement**: over the prompt set, the greedy tokens equal to f16's before the first
  difference, as a share of f16's tokens, and the prompts whose output is identical.

Each configuration runs in its own process so that RSS is its own.  The figures of this
machine are in docs/gpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colours are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "In 1969, the first humans to walk on the Moon were",
]
KV_LINE = re.compile(r"KV buffer size\s*=\s*([\d.]+) MiB")
PLAN_KV = re.compile(r"KV cache .*\n\s*=\s*([\d,]+) B")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(args: argparse.Namespace) -> int:
    """One configuration, in this process: JSON on stdout, llama.cpp's log on stderr."""
    import llama_cpp

    t = getattr(llama_cpp, f"GGML_TYPE_{args.child_type.upper()}")
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.child_ctx, n_batch=256,
                          n_threads=args.threads, n_threads_batch=args.threads,
                          n_gpu_layers=args.n_gpu_layers, type_k=t, type_v=t, flash_attn=True,
                          verbose=True)
    import numpy as np

    n_vocab = llm.n_vocab()

    def last_logits() -> Any:         # llama.cpp's logits of the last token evaluated
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                     shape=(n_vocab,))

    outputs, decode_s, decoded = [], 0.0, 0
    eos = llm.token_eos()
    for prompt in PROMPTS:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=True))
        out: list[int] = []
        t0 = time.perf_counter()
        while len(out) < args.max_tokens:
            tok = int(last_logits().argmax())      # greedy
            if tok == eos:
                break
            out.append(tok)
            llm.eval([tok])
        decode_s += time.perf_counter() - t0
        decoded += len(out)
        outputs.append(out)
    print(json.dumps({"rss_mib": round(rss_mib(), 1), "tokens": outputs,
                      "tok_s": round(decoded / decode_s, 1) if decode_s else 0.0}))
    return 0


def plan_kv_mib(model: str, cache_type: str, n_ctx: int) -> float | None:
    """The plan's KV term: `llmctl check` of a one-model config with these keys."""
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "c.toml"
        cfg.write_text(f'[model]\npath = "{os.path.abspath(model)}"\nn_ctx = {n_ctx}\n'
                       f'cache_type_k = "{cache_type}"\ncache_type_v = "{cache_type}"\n'
                       '[gpu]\nvram_budget_mb = 16777216\n'
                       f'[control]\nrun_dir = "{d}/run"\n')
        r = subprocess.run([sys.executable, "-m", "llmctl.control", "check", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=300)
    m = PLAN_KV.search(r.stdout)
    return round(int(m.group(1).replace(",", "")) / 2**20, 2) if m else None


def run_one(args: argparse.Namespace, cache_type: str, n_ctx: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmctl.tools.kv_cache_measure", "--model", args.model,
           "--threads", str(args.threads), "--max-tokens", str(args.max_tokens),
           "--n-gpu-layers", str(args.n_gpu_layers),
           "--child-type", cache_type, "--child-ctx", str(n_ctx)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.splitlines()[-5:])
        return {"type": cache_type, "n_ctx": n_ctx, "error": f"exit {r.returncode}: {tail}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    kv = sum(float(m) for m in KV_LINE.findall(r.stderr))
    return {"type": cache_type, "n_ctx": n_ctx, "kv_mib": round(kv, 2),
            "plan_kv_mib": plan_kv_mib(args.model, cache_type, n_ctx), **out}


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """(tokens equal to the reference's before the first difference / reference tokens,
    prompts with identical output)."""
    same = total = exact = 0
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += n
        total += len(a)
        exact += a == b
    return (same / total if total else 1.0), exact


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agreement and RSS difference against the f16 row of the same n_ctx."""
    ref = {r["n_ctx"]: r for r in rows if r["type"] == "f16" and "error" not in r}
    for r in rows:
        base = ref.get(r["n_ctx"])
        if "error" in r or base is None:
            continue
        share, exact = agreement(base["tokens"], r["tokens"])
        r["agreement"] = round(share, 3)
        r["identical_prompts"] = f"{exact}/{len(base['tokens'])}"
        r["rss_vs_f16_mib"] = round(r["rss_mib"] - base["rss_mib"], 1)
        if r.get("plan_kv_mib") is not None and base.get("plan_kv_mib") is not None:
            r["plan_vs_f16_mib"] = round(r["plan_kv_mib"] - base["plan_kv_mib"], 1)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| n_ctx | KV type | KV MiB (llama.cpp) | KV MiB (plan) | RSS MiB | RSS vs f16 | "
            "plan vs f16 | tok/s | agreement with f16 | identical prompts |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n_ctx']} | {r['type']} | error: {r['error']} |")
            continue
        lines.append(f"| {r['n_ctx']} | {r['type']} | {r['kv_mib']:.2f} | {r['plan_kv_mib']} | "
                     f"{r['rss_mib']:.1f} | {r.get('rss_vs_f16_mib', '')} | "
                     f"{r.get('plan_vs_f16_mib', '')} | {r['tok_s']:.1f} | "
                     f"{r.get('agreement', '')} | {r.get('identical_prompts', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kv_cache_measure", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--n-ctx", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--child-type", help=argparse.SUPPRESS)
    p.add_argument("--child-ctx", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_type:
        return child(args)
    types = ["f16"] + [t for t in args.types if t != "f16"]
    rows = summarise([run_one(args, t, n) for n in args.n_ctx for t in types])
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "tokens"} for r in rows], indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
