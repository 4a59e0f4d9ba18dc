"""The GPU memory governor: the ``[gpu]`` config, VRAM readers, the breach policy, a monitor.

* ``plan_for_config(cfg)`` / ``check_main(cfg)``: the estimate of ``control/gpu_estimate.py``
  applied to a whole ``Config``: what ``llmctl check`` prints and ``llmctl start`` enforces.
* ``VramReader`` (protocol), ``NvmlReader`` (nvidia-ml-py; never raises: without a GPU or
  without the NVML library it reports ``available() == False``).
* ``check(...)``: the pure breach policy; ``GpuMonitor``: what the supervisor samples every
  ``sample_interval_s``.

The budget covers the memory of llmctl's own workers (NVML's per-process accounting), not
the other processes on the card.  Without a GPU nothing is enforced, and that is said once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

from llmctl.common.config import ON_BREACH, Config, GpuConfig
from llmctl.control.gpu_estimate import (MiB,
                                  Estimate, ModelInfo, ModelInfoError, Plan, VramBudgetError,
                                  effective_gpu_layers, estimate, gpu_layout, plan, read_model)

__all__ = [
    "VramReader", "NvmlReader", "Action", "GpuMonitor", "check",
    "plan_for_config", "startup_plan", "check_main", "warn_if_no_gpu", "NO_GPU_MESSAGE",
    "Estimate", "ModelInfo", "ModelInfoError", "Plan", "VramBudgetError", "estimate", "plan",
    "read_model", "gpu_layout", "effective_gpu_layers", "MiB",
]

log = logging.getLogger(__name__)

NO_GPU_MESSAGE = "no NVIDIA GPU found: running on CPU, VRAM budget not enforced"




def _gpu_of(cfg: Config, gpu: GpuConfig | None) -> GpuConfig:
    return gpu if gpu is not None else getattr(cfg, "gpu", None) or GpuConfig()


def plan_for_config(cfg: Config, gpu: GpuConfig | None = None) -> Plan:
    """The plan of a ``Config`` (its ``[model]``, ``[workers]`` and ``[gpu]``).

    Raises VramBudgetError (the arithmetic in the message) if it does not fit and
    ``gpu.fit`` is false, ModelInfoError if the GGUF cannot be read.
    """
    g = _gpu_of(cfg, gpu)
    return plan(read_model(cfg.model.path), workers=cfg.workers.count, n_ctx=cfg.model.n_ctx,
                slots=cfg.workers.slots, n_gpu_layers=cfg.model.n_gpu_layers,
                n_batch=cfg.model.n_batch, budget_mb=g.vram_budget_mb, fit=g.fit,
                cache_type_k=cfg.model.cache_type_k, cache_type_v=cfg.model.cache_type_v,
                compute_buffer_mb=g.compute_buffer_mb,
                cuda_overhead_mb=g.cuda_overhead_mb)


# ---- reading VRAM -----------------------------------------------------------------------------

@runtime_checkable
class VramReader(Protocol):
    def available(self) -> bool: ...
    def device_name(self) -> str: ...
    def total_bytes(self) -> int: ...
    def used_bytes(self) -> int: ...
    def per_process(self) -> dict[int, int]: ...


class NvmlReader:
    """VRAM readings from NVML (nvidia-ml-py), summed over all devices.

    Every NVML failure (no library, no driver, no device, a GPU that fell off the bus) makes
    ``available()`` False and the readings empty; nothing here raises.
    """

    def __init__(self) -> None:
        self._nv: Any = None
        self._handles: list[Any] = []
        self.why = ""
        try:
            import pynvml
        except ImportError as exc:
            self.why = f"nvidia-ml-py is not installed ({exc})"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.why = f"NVML unavailable: {exc}"
            return
        try:
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                             for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as exc:
            self.why = f"NVML cannot list devices: {exc}"
            self._shutdown(pynvml)
            return
        if not self._handles:
            self.why = "NVML reports no device"
            self._shutdown(pynvml)
            return
        self._nv = pynvml

    @staticmethod
    def _shutdown(nv: Any) -> None:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass

    def _call(self, fn: Any, default: Any) -> Any:
        if self._nv is None:
            return default
        try:
            return fn(self._nv)
        except self._nv.NVMLError as exc:
            log.warning("NVML failed (%s): VRAM readings are no longer available", exc)
            self.why = f"NVML failed: {exc}"
            self.close()
            return default

    def available(self) -> bool:
        return self._nv is not None

    def device_name(self) -> str:
        def names(nv: Any) -> str:
            out = [nv.nvmlDeviceGetName(h) for h in self._handles]
            return ", ".join(n.decode() if isinstance(n, bytes) else str(n) for n in out)
        return self._call(names, "cpu")

    def total_bytes(self) -> int:
        return self._call(lambda nv: sum(int(nv.nvmlDeviceGetMemoryInfo(h).total)
                                         for h in self._handles), 0)

    def used_bytes(self) -> int:
        return self._call(lambda nv: sum(int(nv.nvmlDeviceGetMemoryInfo(h).used)
                                         for h in self._handles), 0)

    def per_process(self) -> dict[int, int]:
        def read(nv: Any) -> dict[int, int]:
            out: dict[int, int] = {}
            for h in self._handles:
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    used = p.usedGpuMemory   # None where the driver cannot tell (e.g. WDDM)
                    out[int(p.pid)] = out.get(int(p.pid), 0) + int(used or 0)
            return out
        return self._call(read, {})

    def close(self) -> None:
        if self._nv is not None:
            nv, self._nv = self._nv, None
            self._shutdown(nv)


_SAID: set[str] = set()


def _say_once(key: str, level: int, msg: str, logger: logging.Logger | None = None) -> None:
    if key not in _SAID:
        _SAID.add(key)
        (logger or log).log(level, "%s", msg)


def warn_if_no_gpu(reader: VramReader, logger: logging.Logger | None = None) -> bool:
    """True if there is a GPU; otherwise log NO_GPU_MESSAGE (once per process) and False."""
    if reader.available():
        return True
    why = getattr(reader, "why", "")
    _say_once(NO_GPU_MESSAGE, logging.INFO, NO_GPU_MESSAGE + (f" ({why})" if why else ""), logger)
    return False


# ---- the breach policy ------------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    kind: str                       # "alert" (log it) | "restart" (restart `worker`)
    message: str
    worker: str | None = None
    pid: int | None = None
    n_gpu_layers: int | None = None  # "restart": start the worker again with this many


def check(readings: Mapping[int, int], budget: int, worker_pids: Mapping[str, int | None],
          action: str, *, gpu_layers: Mapping[str, int] | int = -1, n_layer: int | None = None,
          bytes_per_layer: int = 0) -> list[Action]:
    """The actions a VRAM sample calls for: none within ``budget`` (bytes).

    ``readings``: bytes per pid (``VramReader.per_process``); only the workers' pids count.
    Above the budget: an "alert"; with ``action == "restart_largest"`` also a "restart" of
    the worker using the most VRAM with fewer GPU layers: enough ``bytes_per_layer`` to
    cover the excess (at least one layer), or half its layers when that is unknown.
    ``gpu_layers``: each worker's current n_gpu_layers (-1 = all, needs ``n_layer``).
    """
    if action not in ON_BREACH:
        raise ValueError(f"on_breach {action!r} is not one of {', '.join(ON_BREACH)}")
    use = {w: readings.get(pid, 0) for w, pid in worker_pids.items() if pid is not None}
    total = sum(use.values())
    if total <= budget:
        return []
    shares = ", ".join(f"{w} {n / MiB:.1f}" for w, n in sorted(use.items()))
    actions = [Action("alert", f"VRAM {total / MiB:.1f} MiB is above the budget of "
                               f"{budget / MiB:.0f} MiB (MiB per worker: {shares})")]
    if action != "restart_largest":
        return actions
    worker = max(sorted(use), key=lambda w: use[w])
    cur = gpu_layers.get(worker, -1) if isinstance(gpu_layers, Mapping) else gpu_layers
    if cur < 0 and n_layer is None:
        actions.append(Action("alert", f"cannot reduce {worker}: its layer count is unknown "
                                       "(n_gpu_layers -1 and no model estimate)",
                              worker=worker, pid=worker_pids[worker]))
        return actions
    if cur < 0:
        cur = n_layer + 1
    if n_layer is not None:
        cur = min(cur, n_layer + 1)
    if cur <= 0:
        actions.append(Action("alert", f"{worker} already has no GPU layers: nothing to reduce",
                              worker=worker, pid=worker_pids[worker]))
        return actions
    excess = total - budget
    drop = -(-excess // bytes_per_layer) if bytes_per_layer > 0 else max(1, cur - cur // 2)
    new = max(0, cur - max(1, drop))
    actions.append(Action("restart", f"restarting {worker} ({use[worker] / MiB:.1f} MiB, the "
                                     f"largest) with n_gpu_layers {cur} -> {new}",
                          worker=worker, pid=worker_pids[worker], n_gpu_layers=new))
    return actions


class GpuMonitor:
    """What the supervisor calls every ``sample_interval_s`` (NVML calls are short and
    synchronous; ``asyncio.to_thread`` keeps them off the event loop).

    ``sample(pids)`` returns the status fields; ``poll(pids)`` samples and returns the
    breach actions, logging an alert when a breach starts and when it ends.  After a
    "restart" action it proposes no other restart until that worker runs with a new pid.
    """

    def __init__(self, gpu: GpuConfig | None = None, reader: VramReader | None = None,
                 estimate: Estimate | None = None, n_gpu_layers: int = -1) -> None:
        self.gpu = gpu or GpuConfig()
        self.reader = reader if reader is not None else NvmlReader()
        self.estimate = estimate
        self.layers: dict[str, int] = {}          # per-worker n_gpu_layers after restarts
        self.default_layers = n_gpu_layers
        self.enforced = warn_if_no_gpu(self.reader)
        self.last: dict[str, Any] = self._empty()
        self.per_pid: dict[int, int] = {}           # the last sample, bytes per pid
        self._breach = False
        self._pending: tuple[str, int | None] | None = None   # (worker, its old pid)

    @classmethod
    def for_config(cls, cfg: Config, gpu: GpuConfig | None = None,
                   reader: VramReader | None = None) -> "GpuMonitor":
        """A monitor for a (planned) ``Config``; an unreadable GGUF only loses the estimate."""
        g = _gpu_of(cfg, gpu)
        try:
            est = estimate(read_model(cfg.model.path), n_ctx=cfg.model.n_ctx,
                           slots=cfg.workers.slots, n_gpu_layers=cfg.model.n_gpu_layers,
                           n_batch=cfg.model.n_batch, cache_type_k=cfg.model.cache_type_k,
                           cache_type_v=cfg.model.cache_type_v,
                           compute_buffer_mb=g.compute_buffer_mb,
                           cuda_overhead_mb=g.cuda_overhead_mb)
        except ModelInfoError as exc:
            log.warning("no VRAM estimate: %s", exc)
            est = None
        return cls(g, reader, est, cfg.model.n_gpu_layers)

    @property
    def budget(self) -> int:
        return self.gpu.vram_budget_mb * MiB

    def _empty(self) -> dict[str, Any]:
        return {"device": "cpu", "enforced": False, "budget_mib": float(self.gpu.vram_budget_mb),
                "total_mib": 0.0, "workers": {}, "device_used_mib": 0.0,
                "device_total_mib": 0.0, "breach": False, "on_breach": self.gpu.on_breach,
                "estimate_mib": round(self.estimate.total / MiB, 1) if self.estimate else None}

    def sample(self, worker_pids: Mapping[str, int | None]) -> dict[str, Any]:
        """Per-worker and total MiB, the budget and the device ("cpu" without a GPU)."""
        out = self._empty()
        out["workers"] = {w: 0.0 for w in worker_pids}
        self.per_pid = {}
        if not self.reader.available():
            self.enforced = False
            warn_if_no_gpu(self.reader)
            self.last = out
            return out
        per = self.reader.per_process()
        use = {w: per.get(pid, 0) if pid is not None else 0 for w, pid in worker_pids.items()}
        live = [pid for pid in worker_pids.values() if pid is not None]
        if per and live and not any(pid in per for pid in live):
            _say_once("pids", logging.WARNING,
                      "NVML lists GPU processes but none of the workers' pids (a container "
                      "without the host PID namespace?): per-worker VRAM reads as 0")
        total = sum(use.values())
        out.update(device=self.reader.device_name(), enforced=True,
                   total_mib=round(total / MiB, 1),
                   workers={w: round(n / MiB, 1) for w, n in use.items()},
                   device_used_mib=round(self.reader.used_bytes() / MiB, 1),
                   device_total_mib=round(self.reader.total_bytes() / MiB, 1),
                   breach=total > self.budget)
        self.per_pid = per
        self.last = out
        return out

    def poll(self, worker_pids: Mapping[str, int | None]) -> list[Action]:
        s = self.sample(worker_pids)
        if not s["enforced"]:
            return []
        if self._pending is not None:
            w, old = self._pending
            new = worker_pids.get(w)
            if w not in worker_pids or (new is not None and new != old):
                self._pending = None
        est = self.estimate
        actions = check(self.per_pid, self.budget, worker_pids, self.gpu.on_breach,
                        gpu_layers={w: self.layers.get(w, self.default_layers)
                                    for w in worker_pids},
                        n_layer=est.model.n_layer if est else None,
                        bytes_per_layer=est.per_layer if est else 0)
        if actions and not self._breach:
            log.warning("%s", actions[0].message)
        elif not actions and self._breach:
            log.info("VRAM %.1f MiB is within the budget again", s["total_mib"])
        self._breach = bool(actions)
        kept = []
        for a in actions:
            if a.kind == "restart":
                if self._pending is not None or a.n_gpu_layers is None:
                    continue
                self._pending = (a.worker or "", a.pid)
                self.layers[a.worker or ""] = a.n_gpu_layers
                log.warning("%s", a.message)
            kept.append(a)
        return kept


# ---- `llmctl start` and `llmctl check` ----------------------------------------------------------

def startup_plan(cfg: Config, gpu: GpuConfig | None = None,
                 reader: VramReader | None = None) -> Plan | None:
    """The plan ``llmctl start`` enforces before it spawns workers, or None when there is
    nothing to enforce (no NVIDIA GPU: said once in the log; or n_gpu_layers = 0).

    Raises VramBudgetError when the configuration does not fit and ``fit`` is false;
    with ``fit`` the caller starts ``plan.apply(cfg)`` and reports ``plan.changes``.
    """
    rd = reader if reader is not None else NvmlReader()
    try:
        if not warn_if_no_gpu(rd) or cfg.model.n_gpu_layers == 0:
            return None
    finally:
        if reader is None:
            rd.close()      # type: ignore[attr-defined]
    return plan_for_config(cfg, gpu)


# ---- `llmctl check` -------------------------------------------------------------------------------

def check_main(cfg: Config, gpu: GpuConfig | None = None, reader: VramReader | None = None) -> str:
    """The text ``llmctl check`` prints: device, estimate with its arithmetic, verdict.

    Raises VramBudgetError (its message is the same text, with the refusal) when the
    configuration does not fit and ``fit`` is false; ModelInfoError for an unreadable GGUF.
    """
    g = _gpu_of(cfg, gpu)
    rd = reader if reader is not None else NvmlReader()
    if rd.available():
        device = (f"GPU: {rd.device_name()}, {rd.total_bytes() / MiB:,.0f} MiB, "
                  f"{rd.used_bytes() / MiB:,.0f} MiB in use; the budget is enforced")
    else:
        why = getattr(rd, "why", "")
        device = f"GPU: none ({why or 'no NVIDIA GPU'}): {NO_GPU_MESSAGE}"
    if reader is None:
        rd.close()          # type: ignore[attr-defined]
    try:
        p = plan_for_config(cfg, g)
    except VramBudgetError as exc:
        raise VramBudgetError(f"{device}\n{exc}", exc.plan) from None
    head = f"{device}\n[gpu] on_breach = {g.on_breach}, sampled every {g.sample_interval_s:g}s"
    return f"{head}\n{p.text()}"
