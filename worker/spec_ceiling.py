"""What n-gram speculation can gain on a prompt set, and what a verification row costs here.

    python -m llmctl.worker.spec_ceiling [--model M.gguf] [--prompts docs/prompts/grounded.jsonl]
        [--max-tokens 128] [--drafts 2 4 8] [--threads 2] [--rows 9] [--json PATH]

Two figures bound what ``speculative = "ngram"`` can do, apart from the engine around it:

* **the drafts' hit rate**, from the model's greedy answers to the prompts: the answers
  are replayed through the worker's own ``Drafter`` (``worker/speculate.py``), each step
  drafting up to k tokens after the step's token, every draft verified against the
  answer.  ``kept`` is the share of the answer's tokens that came from kept drafts;
  ``steps`` the decode steps left per token without speculation (1.0 = no gain); ``rows``
  the rows those steps decode per token.  These depend on the model and the prompts only,
  not on the machine.
* **a row's cost**, on this machine: the time of one ``llama_decode`` of one sequence
  with 1, 2, ... ``--rows`` rows (all with logits, as a verification has), after a
  100-token prompt; the median of 15.  ``fixed`` and ``per row`` are the least-squares
  line through them.

Their product is the ceiling: a step costs ``fixed + per_row x rows``, so speculation
with drafts of up to k tokens makes a sequence at most ``(fixed + per_row) /
(steps x fixed + rows x per_row)`` times as fast, before sampling each row and the
engine's own work.  Where a row costs almost nothing (decoding that reads the weights
once per step, as on a GPU) the ceiling is ``1 / steps``.  Greedy, one sequence, the
prompt not counted.  Run it on a quiet machine: the row costs are timings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from llmctl.common.prompts import load_prompts
from llmctl.worker.engine import chat_formatter
from llmctl.worker.speculate import Drafter


def answers(llm: Any, prompts: list[dict[str, Any]], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each prompt's tokens (chat messages after the chat template, as the worker renders
    them) and its greedy answer's tokens."""
    import llama_cpp

    fmt = chat_formatter(llm._model, llm.metadata)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    out = []
    for p in prompts:
        if p.get("messages") is None:
            ptoks = llm.tokenize(p["prompt"].encode("utf-8"), add_bos=True, special=False)
        else:
            rendered = fmt(messages=p["messages"])
            ptoks = llm.tokenize(rendered.prompt.encode("utf-8"),
                                 add_bos=not getattr(rendered, "added_special", False),
                                 special=True)
        toks: list[int] = []
        llm.reset()
        for t in llm.generate(ptoks, temp=0.0, top_k=1):
            if llama_cpp.llama_vocab_is_eog(vocab, t) or len(toks) >= max_tokens:
                break
            toks.append(t)
        out.append((ptoks, toks))
    return out


def replay(prompt: list[int], answer: list[int], k: int) -> tuple[int, int, int]:
    """(steps, rows, kept) of drafting up to ``k`` tokens a step through ``answer``."""
    d = Drafter(prompt, k)
    i = steps = rows = kept = 0
    while i < len(answer):
        d.push(answer[i])                       # the step's token: drafts follow it
        d.probe, d.paused, d.kept, d.missed = False, 0, 1e12, 0.0   # always draft k
        draft = d.draft(k)
        a = 0
        while a < len(draft) and i + 1 + a < len(answer) and answer[i + 1 + a] == draft[a]:
            a += 1
        for t in answer[i + 1:i + 1 + a]:
            d.push(t)
        steps, rows, kept, i = steps + 1, rows + 1 + len(draft), kept + a, i + 1 + a
    return steps, rows, kept


def row_costs(llm: Any, rows: int) -> list[float]:
    """Median ms of one decode of 1..``rows`` rows, all with logits, after 100 tokens."""
    base = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 10)[:100]
    llm.reset()
    llm.eval(base)
    n0, ms = llm.n_tokens, []
    for n in range(1, rows + 1):
        times = []
        for _ in range(16):
            llm._ctx.kv_cache_seq_rm(-1, n0, -1)
            llm._batch.set_batch(batch=base[:n], n_past=n0, logits_all=True)
            t0 = time.perf_counter()
            llm._ctx.decode(llm._batch)
            times.append((time.perf_counter() - t0) * 1000)
        ms.append(statistics.median(times[1:]))
    return ms


def line(ms: list[float]) -> tuple[float, float]:
    """Least squares ``ms[n-1] = fixed + per_row x n``."""
    xs = range(1, len(ms) + 1)
    mx, my = statistics.fmean(xs), statistics.fmean(ms)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ms)) / sum((x - mx) ** 2 for x in xs)
    return my - per * mx, per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmctl.worker.spec_ceiling",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--prompts", nargs="+", type=Path,
                    default=[Path("docs/prompts/grounded.jsonl"), Path("docs/prompts/free.jsonl")])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--drafts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=9, help="time decodes of 1..ROWS rows (0: none)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    from llama_cpp import Llama
    llm = Llama(model_path=a.model, n_ctx=2048, n_batch=512, n_threads=a.threads,
                n_threads_batch=a.threads, logits_all=True, verbose=False)
    report: dict[str, Any] = {"model": a.model, "max_tokens": a.max_tokens, "sets": {}}
    cost = None
    if a.rows:
        ms = row_costs(llm, a.rows)
        fixed, per = line(ms)
        cost = (fixed, per)
        report["row_ms"] = {"rows": list(range(1, a.rows + 1)), "ms": ms,
                            "fixed": fixed, "per_row": per}
        print("decode of n rows, ms: " + ", ".join(f"{n}: {m:.1f}" for n, m in
                                                   enumerate(ms, 1)))
        print(f"  = {fixed:.1f} fixed + {per:.1f} per row\n")
    print(f"{'prompts':<14} {'k':>2} {'tokens':>7} {'kept':>6} {'steps':>6} {'rows':>6}"
          f" {'ceiling, row free':>18} {'ceiling, here':>14}")
    for path in a.prompts:
        pairs = answers(llm, load_prompts(path), a.max_tokens)
        tokens = sum(len(ans) for _, ans in pairs)
        sets = report["sets"][path.name] = []
        for k in a.drafts:
            steps = rows = kept = 0
            for p, ans in pairs:
                s, r, kk = replay(p, ans, k)
                steps, rows, kept = steps + s, rows + r, kept + kk
            point = {"k": k, "tokens": tokens, "kept": kept / tokens,
                     "steps": steps / tokens, "rows": rows / tokens,
                     "ceiling_row_free": tokens / steps}
            here = ""
            if cost:
                fixed, per = cost
                point["ceiling_here"] = (fixed + per) / (point["steps"] * fixed
                                                         + point["rows"] * per)
                here = f"{point['ceiling_here']:.2f}x"
            sets.append(point)
            print(f"{path.name:<14} {k:>2} {tokens:>7} {point['kept']:>6.0%} "
                  f"{point['steps']:>6.2f} {point['rows']:>6.2f} "
                  f"{point['ceiling_row_free']:>17.2f}x {here:>14}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
