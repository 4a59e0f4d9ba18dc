"""A synthetic engine: the worker's whole protocol, no model (a benchmarking and test aid).

``[model] engine = "synthetic"`` runs workers that speak exactly what a real one speaks —
READY with its slots as credits, token windows and CREDIT, one BATCH per engine step,
CANCEL in prefill and decode, PARK and RESUME, DONE with its statistics — but make their
tokens on a clock instead of a GPU: every step takes ``[synthetic] step_ms`` and gives one
token to every decoding sequence that has token credit, after a prefill of
``prefill_tokens_per_ms``.  So the gateway, the fronts and the clients can be driven at
GPU token rates (a 1 ms step is 1,000 tokens/s per sequence) on a machine without one.

Each token's text is ``[synthetic] piece``, or with ``stamp = true`` the
``time.monotonic_ns()`` at which the step made it (and a space): the load generator reads
it back to measure the latency the data plane adds between the worker and the client.
Stop strings apply as usual; there is no end-of-generation token: a sequence ends at
``max_tokens`` (``length``) or a stop string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec

from llmctl.common.config import SyntheticConfig
from llmctl.common.errors import BadRequest, InternalError
from llmctl.common.request import GenRequest
from llmctl.common.prefix import request_hashes
from llmctl.worker.engine import Event, Sequence, TextStream, done_stats


@dataclass(eq=False)
class SynthSeq(Sequence):
    pass


class SyntheticEngine:
    device = "synthetic"
    store = None

    def __init__(self, cfg: SyntheticConfig, n_ctx: int, slots: int,
                 model_name: str = "synthetic") -> None:
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.capacity = slots
        self.model_name = model_name
        self.running: dict[int, SynthSeq] = {}
        self.parked: dict[int, SynthSeq] = {}
        self._next_step = 0.0
        self._prefill_per_step = max(1, int(cfg.prefill_tokens_per_ms * max(cfg.step_ms, 0.001)))

    # ---- the engine interface (as worker/batch.py's BatchEngine) ------------------------
    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.running)

    @property
    def active(self) -> SynthSeq | None:
        return next(iter(self.running.values()), None)

    @property
    def runnable(self) -> bool:
        return any(s.prefilled < s.n_prompt or s.window > 0 for s in self.running.values())

    def utility(self, req: GenRequest) -> Any:
        raise BadRequest("the synthetic engine has no tokenizer: use [model] engine = \"llama\"")

    def prepare(self, rid: int, req: GenRequest) -> SynthSeq:
        if req.grammar is not None or req.json_schema is not None or req.logprobs or req.embed:
            raise BadRequest("the synthetic engine has no grammar sampler and no logprobs: "
                             "use [model] engine = \"llama\"")
        if req.messages:
            text = "".join(f"{m.role}\n{m.content}\n" for m in req.messages)
        elif req.prompt is not None:
            text = req.prompt
        else:
            raise BadRequest("exactly one of prompt and messages is required")
        n = max(1, len(text.encode("utf-8")) // 4)      # about four bytes a token
        if n >= self.n_ctx:
            raise BadRequest(f"prompt is {n} tokens; the context holds {self.n_ctx}")
        seq = SynthSeq(rid=rid, tokens=[0] * n, max_tokens=min(req.max_tokens, self.n_ctx - n),
                       window=req.window or 1 << 30, sampler=None,
                       stream=TextStream(tuple(req.stop)))
        seq.hashes = request_hashes(req)
        return seq

    def start(self, seq: SynthSeq) -> None:
        if not self.free_slots or seq.rid in self.running:
            raise InternalError("engine is busy: a GENERATE arrived without credit")
        self.running[seq.rid] = seq

    def grant(self, rid: int, n: int) -> None:
        seq = self.running.get(rid) or self.parked.get(rid)
        if seq is not None:
            seq.window += n

    def cancel(self, rid: int) -> Event | None:
        seq = self.running.get(rid) or self.parked.get(rid)
        return None if seq is None else self._finish(seq, "cancelled", flush=False)

    def park(self, rid: int, yields: bool = False) -> bool:
        seq = self.running.get(rid)
        if seq is None or (seq.window > 0 and not yields) or seq.prefilled < seq.n_prompt:
            return False
        self.parked[rid] = self.running.pop(rid)
        return True

    def resume(self, rid: int) -> None:
        if rid not in self.parked:
            raise InternalError(f"request {rid} is not parked here")
        if not self.free_slots:
            raise InternalError("engine is busy: a RESUME arrived without credit")
        self.running[rid] = self.parked.pop(rid)

    def prefixes(self) -> list[int]:
        return []

    def step(self) -> list[Event]:
        """One step: ``step_ms`` of 'compute', a token for each decoding sequence with
        credit, a prefill chunk for the oldest sequence in prefill."""
        now = time.monotonic()
        if now < self._next_step:
            time.sleep(self._next_step - now)
        self._next_step = max(now, self._next_step) + self.cfg.step_ms / 1000
        events: list[Event] = []
        piece = self.cfg.piece
        stamp = self.cfg.stamp
        for seq in list(self.running.values()):
            if seq.prefilled < seq.n_prompt or seq.window <= 0:
                continue
            seq.generated += 1
            text = seq.stream.push((f"{time.monotonic_ns()} " if stamp else piece).encode())
            if seq.stream.stopped or seq.generated >= seq.max_tokens:
                end = self._finish(seq, "stop" if seq.stream.stopped else "length")
                events += [Event(seq.rid, text), end] if text else [end]
            elif text:
                seq.window -= 1
                events.append(Event(seq.rid, text))
        filling = next((s for s in self.running.values() if s.prefilled < s.n_prompt), None)
        if filling is not None:
            filling.prefilled = min(filling.n_prompt, filling.prefilled + self._prefill_per_step)
            if filling.prefilled == filling.n_prompt:
                filling.t_prefill_done = time.monotonic()
        return events

    def _finish(self, seq: SynthSeq, reason: str, flush: bool = True) -> Event:
        self.running.pop(seq.rid, None)
        self.parked.pop(seq.rid, None)
        tail = seq.stream.finish() if flush else ""
        return Event(seq.rid, tail, msgspec.structs.replace(done_stats(seq, reason),
                                                            prefix_hashes=[]))
