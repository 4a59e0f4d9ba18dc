"""The baseline: the bench workload run by bare llama-cpp-python in this process.

    llmctl bench --target "bare:models/SmolLM2-135M-Instruct.Q4_1.gguf?threads=2" \
        --requests 20 --max-tokens 64 --json bare.json

One ``Llama`` object, ``create_completion(stream=True)`` (``create_chat_completion`` for
``messages`` prompts), one request at a time: the floor that any server around llama.cpp adds
its costs to. With ``--clients`` above 1 the requests queue for the single model (FIFO), which
is what one sequence without batching can do. The target of tools/bench.py's
``--target bare:MODEL.gguf?threads=2&n_ctx=2048&n_batch=256``.

Tokens out: llama-cpp-python's stream reports no usage, so sampled tokens are counted by a
logits processor (one call per sampled token; the end-of-generation token is not counted).
"""
from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llmctl.common.client import now
from llmctl.tools.bench_stats import RequestRecord
from llmctl.tools.bench_targets import Target


class BareLlamaTarget(Target):
    def __init__(self, model: str, threads: int | None = None, n_ctx: int = 2048,
                 n_batch: int = 256) -> None:
        self.model_path, self.n_ctx, self.n_batch = model, n_ctx, n_batch
        self.threads = threads or os.cpu_count() or 1
        self.url = f"bare:{model}"
        self.info: dict[str, Any] = {"protocol": "in-process", "threads": self.threads,
                                     "n_ctx": n_ctx, "n_batch": n_batch}
        self.llm: Any = None
        self.lock = asyncio.Lock()     # one model, one sequence: requests take turns

    @classmethod
    def from_url(cls, url: str) -> "BareLlamaTarget":
        u = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        return cls(u.path, threads=int(q["threads"]) if "threads" in q else None,
                   n_ctx=int(q.get("n_ctx", 2048)), n_batch=int(q.get("n_batch", 256)))

    async def open(self) -> None:
        if self.llm is None:
            self.llm = await asyncio.to_thread(self._load)

    def _load(self) -> Any:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=self.model_path, n_ctx=self.n_ctx, n_batch=self.n_batch,
                              n_threads=self.threads, n_gpu_layers=0, verbose=False)
        self.info.update(server=f"llama-cpp-python/{llama_cpp.__version__}",
                         model=os.path.basename(self.model_path))
        return llm

    async def request(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        async with self.lock:
            return await asyncio.to_thread(self._run, index, spec)

    def _run(self, index: int, spec: dict[str, Any]) -> RequestRecord:
        import numpy as np
        llm = self.llm
        sampled = 0
        eog = [t for t in {llm.token_eos()} if t >= 0]

        def count(_ids: Any, scores: Any) -> Any:
            nonlocal sampled
            sampled += 1
            if spec.get("ignore_eos"):
                scores[eog] = -np.inf
            return scores

        kwargs: dict[str, Any] = {"max_tokens": spec["max_tokens"], "stream": True,
                                  "logits_processor": [count]}
        for k in ("temperature", "top_p", "top_k", "seed", "stop"):
            if spec.get(k) is not None:
                kwargs[k] = spec[k]
        rec = RequestRecord(index=index, t_start=now())
        try:
            if "messages" in spec:
                chunks = llm.create_chat_completion(messages=spec["messages"], **kwargs)
                text_of = lambda ch: (ch["choices"][0].get("delta") or {}).get("content")  # noqa: E731
            else:
                chunks = llm.create_completion(prompt=spec["prompt"], **kwargs)
                text_of = lambda ch: ch["choices"][0].get("text")  # noqa: E731
            for ch in chunks:
                t = now()
                if ch.get("choices") and text_of(ch):
                    rec.piece_times.append(t)
                if ch.get("choices") and ch["choices"][0].get("finish_reason"):
                    rec.finish_reason = ch["choices"][0]["finish_reason"]
        except Exception as exc:   # noqa: BLE001 - recorded like a server's internal error
            rec.t_end, rec.error, rec.message = now(), "internal", f"{type(exc).__name__}: {exc}"
            return rec
        rec.t_end = now()
        # The processor also ran for the end-of-generation token when the model stopped itself.
        rec.completion_tokens = sampled - 1 if rec.finish_reason == "stop" and sampled else sampled
        return rec

    async def close(self) -> None:
        pass   # the model stays loaded: --compare alternates points between two targets
