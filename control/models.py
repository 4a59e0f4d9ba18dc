"""The served models' desired state: which are loaded, and the memory plan that decides.

Each served model (``cfg.served``) is ``unloaded``, ``loading`` (its workers start),
``loaded`` (all of them have been ready) or ``unloading`` (drained and stopped): a
``states.ModelState``.  The supervisor's reconcile loop turns ``desired_workers()`` into
processes (``Rollout``) and calls ``step`` every tick with what runs and what the gateway
says of each model's requests; ``step`` moves the states and says what to tell the
gateway.  ``observe`` is its first half, what runs moving the states, which the
supervisor also calls the moment a worker gets ready: a model whose workers serve is
``loaded`` before any answer of theirs can reach a client.

The plan: each model needs ``need_mib`` (the GGUF-based estimate of
``control/gpu_estimate.py``, times its workers: VRAM with a GPU, host memory on a CPU,
where the host KV store ``prompt_cache_mib`` counts too; a model with a draft model
counts the draft's weights, KV and compute buffers in each of its workers too).  A model starts only when the
models not unloaded, itself included, fit the budget.  A model that is asked for (a
request waits, ``llmctl load``) and does not fit has the least recently used idle
on-demand models unloaded first, and starts once their processes are gone; if nothing
can make room it is refused with a clear reason (``overloaded`` with ``retry_after_ms``
while busy models hold the memory, ``not_ready`` if it alone exceeds the budget).  The
plan is never breached: eviction completes before a load begins.

``load = "always"`` models load at start and are never evicted; ``on_demand`` ones also
unload after ``keep_alive_s`` without a request.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from llmctl.common.config import Config, ModelEntry
from llmctl.control.states import ModelState, move

log = logging.getLogger(__name__)

RETRY_AFTER_MS = 1000        # what a refused load suggests while busy models hold the memory


@dataclass
class ServedModel:
    entry: ModelEntry
    cfg: Config                       # what each of its workers runs
    names: list[str]                  # its worker names (w0, w1, ...)
    need_mib: float | None            # the plan's figure; None = unknown (counted as 0)
    state: ModelState = ModelState.UNLOADED      # changed by ``to`` only
    since: float = field(default_factory=time.monotonic)
    wanted: bool = False              # a request waits for it, or `llmctl load`
    last_used: float = 0.0            # monotonic; from the gateway's idle time
    loads: int = 0
    evictions: int = 0
    error: str = ""                   # why the last load was refused or failed

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def evictable(self) -> bool:
        return self.entry.load == "on_demand"

    def __str__(self) -> str:
        return f"model {self.name}"

    def to(self, state: ModelState, now: float) -> None:
        log.info("model %s: %s -> %s", self.name, self.state.value, state.value)
        self.state, self.since = move(self, self.state, state), now


@dataclass(frozen=True)
class Refusal:
    """Tell the gateway: ``model``'s queued requests get this error."""
    model: str
    code: str                        # overloaded | not_ready
    message: str
    retry_after_ms: int | None = None


def worker_names(cfg: Config) -> dict[str, list[str]]:
    """Each served model's worker names, numbered across models in config order."""
    out, i = {}, 0
    for e in cfg.served:
        out[e.name] = [f"w{j}" for j in range(i, i + e.workers)]
        i += e.workers
    return out


class ModelManager:
    def __init__(self, cfg: Config, needs: Mapping[str, float | None], budget_mib: float,
                 kind: str = "ram") -> None:
        self.budget_mib = budget_mib        # 0 = no budget
        self.kind = kind                    # "vram" or "ram": what the plan counts
        self.models: dict[str, ServedModel] = {}
        self.planned = True                 # the figures are known (see step)
        self.configure(cfg, needs)
        now = time.monotonic()
        for m in self.models.values():
            if m.entry.load == "always":
                m.to(ModelState.LOADING, now)
                m.loads += 1

    def configure(self, cfg: Config, needs: Mapping[str, float | None]) -> None:
        """A (re)loaded config: the same names keep their states, with new settings."""
        names = worker_names(cfg)
        old = self.models
        self.models = {}
        for e in cfg.served:
            m = old.get(e.name)
            wcfg = cfg.for_model(e)
            if m is None:
                m = ServedModel(e, wcfg, names[e.name], needs.get(e.name))
            else:
                m.entry, m.cfg, m.names, m.need_mib = e, wcfg, names[e.name], needs.get(e.name)
            self.models[e.name] = m

    # ---- asked for ------------------------------------------------------------------------
    def want(self, name: str) -> str | None:
        """A request waits for ``name`` (or `llmctl load`); an error text if unknown."""
        m = self.models.get(name)
        if m is None:
            return f"no such model: {name}"
        if m.state in (ModelState.UNLOADED, ModelState.UNLOADING) and not m.wanted:
            m.wanted, m.error = True, ""
        return None

    def unload(self, name: str, now: float | None = None) -> str | None:
        m = self.models.get(name)
        if m is None:
            return f"no such model: {name}"
        m.wanted = False
        if m.state in (ModelState.LOADING, ModelState.LOADED):
            m.to(ModelState.UNLOADING, now or time.monotonic())
        return None

    # ---- the plan ---------------------------------------------------------------------------
    def used_mib(self) -> float:
        """What the plan counts now: every model that is not unloaded."""
        return sum(m.need_mib or 0.0 for m in self.models.values()
                   if m.state is not ModelState.UNLOADED)

    def _fits(self, extra: float, minus: Iterable[ServedModel] = ()) -> bool:
        if not self.budget_mib:
            return True
        gone = sum(m.need_mib or 0.0 for m in minus)
        return self.used_mib() - gone + extra <= self.budget_mib + 1e-6

    def desired_workers(self) -> dict[str, Config]:
        """Worker name -> config, for every model loading or loaded."""
        return {n: m.cfg for m in self.models.values()
                if m.state in (ModelState.LOADING, ModelState.LOADED) for n in m.names}

    # ---- one tick ---------------------------------------------------------------------------
    def step(self, now: float, ready: Mapping[str, bool], running: Mapping[str, bool],
             fatal: Mapping[str, str], usage: Mapping[str, Mapping[str, Any]] | None
             ) -> list[Refusal]:
        """``ready[name]``: worker ``name`` runs and has been ready; ``running[name]``: a
        process of that name exists (serving, starting or retiring); ``fatal[name]``: why
        it will not start again; ``usage``: the gateway's per-model figures (None = not
        known this tick: nothing is evicted or expired)."""
        if usage is not None:
            for m in self.models.values():
                u = usage.get(m.name) or {}
                if u.get("idle_s") is not None:
                    m.last_used = max(m.last_used, now - float(u["idle_s"]))
        out = self.observe(now, ready, running, fatal)
        if usage is not None:
            self._expire(now, usage)
        if self.budget_mib and not self.planned:
            return out                      # no load decided before the figures are known
        for m in sorted(self.models.values(), key=lambda x: x.since):
            if m.wanted and m.state is ModelState.UNLOADED:
                refusal = self._try_load(m, now, usage)
                if refusal is not None:
                    out.append(refusal)
        return out

    def observe(self, now: float, ready: Mapping[str, bool], running: Mapping[str, bool],
                fatal: Mapping[str, str]) -> list[Refusal]:
        """What runs moves the states (``step``'s arguments): a model whose workers have
        all been ready is loaded, one whose worker cannot start is refused, one whose
        processes are gone is unloaded."""
        out: list[Refusal] = []
        for m in self.models.values():
            if m.state is ModelState.LOADING:
                failed = [fatal[n] for n in m.names if n in fatal]
                if failed and m.evictable:      # an always model stays, its worker FATAL
                    m.error = f"model {m.name} failed to load: {failed[0]}"
                    log.error("%s", m.error)
                    m.wanted = False
                    m.to(ModelState.UNLOADING, now)
                    out.append(Refusal(m.name, "not_ready", m.error))
                elif all(ready.get(n) for n in m.names):
                    m.error = ""
                    m.to(ModelState.LOADED, now)
            elif m.state is ModelState.UNLOADING and not any(running.get(n) for n in m.names):
                m.to(ModelState.UNLOADED, now)
        return out

    def _expire(self, now: float, usage: Mapping[str, Mapping[str, Any]]) -> None:
        """keep_alive_s: an idle on-demand model unloads."""
        for m in self.models.values():
            ka = m.entry.keep_alive_s
            if m.state is not ModelState.LOADED or not m.evictable or not ka:
                continue
            if (usage.get(m.name) or {}).get("open", 0):
                continue
            if now - max(m.last_used, m.since) >= ka:
                log.info("model %s idle for %.0fs (keep_alive_s %g): unloading", m.name,
                         now - max(m.last_used, m.since), ka)
                m.to(ModelState.UNLOADING, now)

    def _try_load(self, m: ServedModel, now: float,
                  usage: Mapping[str, Mapping[str, Any]] | None) -> Refusal | None:
        need = m.need_mib or 0.0
        if self._fits(need):
            m.wanted, m.error = False, ""
            m.loads += 1
            m.to(ModelState.LOADING, now)
            return None
        if self.budget_mib and need > self.budget_mib:
            m.wanted = False
            m.error = (f"model {m.name} needs {need:.0f} MiB ({self.kind} plan), more than "
                       f"the whole budget of {self.budget_mib:.0f} MiB")
            return Refusal(m.name, "not_ready", m.error)
        if any(x.state is ModelState.UNLOADING for x in self.models.values()):
            return None                 # room is being made: load once it is gone
        if usage is None:
            return None                 # who is idle is not known this tick
        idle = [x for x in self.models.values() if x is not m and x.state is ModelState.LOADED
                and x.evictable and not (usage.get(x.name) or {}).get("open", 0)]
        idle.sort(key=lambda x: max(x.last_used, x.since))        # least recently used first
        evict: list[ServedModel] = []
        for x in idle:
            evict.append(x)
            if self._fits(need, evict):
                for v in evict:
                    log.info("model %s: evicted (least recently used, idle) to make room for "
                             "%s (%.0f MiB)", v.name, m.name, need)
                    v.evictions += 1
                    v.to(ModelState.UNLOADING, now)
                return None
        m.wanted = False
        busy = [f"{x.name} ({x.need_mib or 0:.0f} MiB, {x.state})"
                for x in self.models.values() if x.state is not ModelState.UNLOADED and x is not m]
        m.error = (f"model {m.name} ({need:.0f} MiB) does not fit the {self.kind} budget of "
                   f"{self.budget_mib:.0f} MiB beside {', '.join(busy)}, and none of them is "
                   "idle and evictable")
        return Refusal(m.name, "overloaded", m.error, RETRY_AFTER_MS)

    # ---- what `llmctl models` shows -----------------------------------------------------------
    def rows(self, now: float, measured: Mapping[str, float | None],
             usage: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in self.models.values():
            u = usage.get(m.name) or {}
            out.append({
                "name": m.name, "path": m.entry.path, "load": m.entry.load,
                "state": m.state.value,
                "workers": m.names, "workers_ready": u.get("workers_ready", 0),
                "need_mib": round(m.need_mib, 1) if m.need_mib is not None else None,
                "measured_mib": measured.get(m.name),
                "plan": self.kind, "budget_mib": self.budget_mib or None,
                "last_used_s": round(now - m.last_used, 1) if m.last_used else None,
                "keep_alive_s": m.entry.keep_alive_s,
                "queue": u.get("queue", 0), "inflight": u.get("inflight", 0),
                "loads": m.loads, "evictions": m.evictions, "error": m.error,
                "default": m is next(iter(self.models.values())),
            })
        return out


def plan_budget(cfg: Config, reader: Any = None) -> tuple[float, str]:
    """(the plan's budget in MiB, 0 = none; "vram" with an NVIDIA GPU, else "ram"): fast,
    no GGUF read."""
    from llmctl.control.gpu import NvmlReader
    rd = reader if reader is not None else NvmlReader()
    try:
        on_gpu = rd.available()
    finally:
        if reader is None:
            rd.close()
    if on_gpu:
        return float(cfg.gpu.vram_budget_mb), "vram"
    return float(cfg.host.ram_budget_mb), "ram"


PLAN_CACHE = "plan-cache.json"      # in run_dir: figures by their inputs (llmctl start's)


def _cache_key(e: ModelEntry, cfg: Config, on_gpu: bool) -> str | None:
    """Every input of a model's figure, the GGUF's size and mtime included."""
    d = cfg.entry(e.draft) if e.speculative == "draft" else None
    try:
        st = os.stat(e.path)
        draft = [] if d is None else [d.path, *_stamp(os.stat(d.path)), d.n_gpu_layers,
                                      e.spec_max_draft]
    except OSError:
        return None
    g = cfg.gpu
    return json.dumps([e.path, *_stamp(st), on_gpu, e.n_ctx, e.slots, e.workers,
                       e.n_gpu_layers, cfg.model.n_batch, e.cache_type_k, e.cache_type_v,
                       g.compute_buffer_mb,
                       g.cuda_overhead_mb, cfg.workers.prompt_cache_mib, *draft])


def _stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def memory_plan(cfg: Config, reader: Any = None) -> tuple[dict[str, float | None], float, str]:
    """(MiB each served model needs, the budget in MiB (0 = none), "vram" or "ram").

    With an NVIDIA GPU the plan counts VRAM (the estimate of ``llmctl check`` per worker:
    offloaded weights, KV, compute buffers, CUDA overhead) against ``[gpu]
    vram_budget_mb``; a model with ``n_gpu_layers = 0`` needs none.  On a CPU host it counts
    host memory (all weights, KV and compute buffers, no CUDA, plus the worker's host KV
    store ``prompt_cache_mib``) against ``[host] ram_budget_mb``.  An unreadable GGUF (or
    the synthetic engine) has no figure: None, counted as 0 and said in the log.
    """
    from llmctl.control.gpu_estimate import MiB, ModelInfoError, estimate, read_model
    budget, kind = plan_budget(cfg, reader)
    on_gpu = kind == "vram"
    g = cfg.gpu
    needs: dict[str, float | None] = {}
    # GGUFReader takes seconds per model (it parses the whole vocabulary): the figures that
    # `llmctl start` computed are kept in run_dir, keyed by every input.
    cache_path = cfg.run_dir / PLAN_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    fresh = {}
    for e in cfg.served:
        if cfg.model.engine == "synthetic":
            needs[e.name] = None
            continue
        key = _cache_key(e, cfg, on_gpu)
        if key is not None and isinstance(cache.get(key), (int, float)):
            needs[e.name] = fresh[key] = float(cache[key])
            continue
        try:
            per = estimate(read_model(e.path), n_ctx=e.n_ctx, slots=e.slots,
                           n_gpu_layers=e.n_gpu_layers if on_gpu else -1,
                           n_batch=cfg.model.n_batch, cache_type_k=e.cache_type_k,
                           cache_type_v=e.cache_type_v, compute_buffer_mb=g.compute_buffer_mb,
                           cuda_overhead_mb=g.cuda_overhead_mb if on_gpu else 0).total
            d = cfg.entry(e.draft) if e.speculative == "draft" else None
            if d is not None:       # in the same worker: its weights, its KV of e's shape
                per += estimate(read_model(d.path), n_ctx=e.n_ctx, slots=e.slots,
                                n_gpu_layers=d.n_gpu_layers if on_gpu else -1,
                                n_batch=max(cfg.model.n_batch, e.slots * (e.spec_max_draft + 1)),
                                cache_type_k=e.cache_type_k, cache_type_v=e.cache_type_v,
                                compute_buffer_mb=g.compute_buffer_mb, cuda_overhead_mb=0).total
        except ModelInfoError as exc:       # an unreadable GGUF, a cache type it cannot take
            log.warning("model %s: no memory estimate: %s", e.name, exc)
            needs[e.name] = None
            continue
        if not on_gpu:
            per += cfg.workers.prompt_cache_mib * MiB
        needs[e.name] = per * e.workers / MiB
        if key is not None:
            fresh[key] = needs[e.name]
    if fresh and fresh != cache and cache_path.parent.is_dir():
        try:
            cache_path.write_text(json.dumps(fresh))
        except OSError as exc:
            log.debug("plan cache not written: %s", exc)
    return needs, budget, kind


def check_plan(cfg: Config, needs: Mapping[str, float | None], budget: float,
               kind: str) -> str | None:
    """Why this config cannot start under its budget (None: it can): the always-loaded
    models together, or any one model alone, exceeding it."""
    if not budget:
        return None
    always = [(e.name, needs.get(e.name) or 0.0) for e in cfg.served if e.load == "always"]
    total = sum(n for _, n in always)
    if total > budget:
        parts = " + ".join(f"{name} {n:.0f}" for name, n in always)
        return (f"the load = \"always\" models need {parts} = {total:.0f} MiB of {kind}, more "
                f"than the budget of {budget:.0f} MiB")
    for e in cfg.served:
        n = needs.get(e.name) or 0.0
        if n > budget:
            return (f"model {e.name} needs {n:.0f} MiB of {kind}, more than the budget of "
                    f"{budget:.0f} MiB: it could never be loaded")
    return None
