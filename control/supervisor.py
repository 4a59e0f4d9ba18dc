"""The supervisor: a reconcile loop over its child processes.

Desired state: one gateway and ``workers.count`` workers, all running.  Every tick
the loop compares that with what runs, restarts what died (``ChildProcess``'s
policy), kills what the gateway declared dead while it still runs (a hung worker),
and gives up on what flaps (FATAL).  Readiness comes from the gateway: a worker is
ready once its READY reached the gateway (matched by pid).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import msgspec
import psutil
import zmq
import zmq.asyncio

from llmctl.common import config as config_mod
from llmctl.control import gpu
from llmctl.control.child import ChildProcess, WorkerProcess
from llmctl.common.config import Config, ConfigError
from llmctl.common.procs import bind_private, describe_exit, make_private
from llmctl.common import messages as m

log = logging.getLogger(__name__)

TICK_S = 0.2
STATUS_POLL_S = 0.5
# Sections a rolling reload applies; the rest needs a restart of the gateway.
ROLLING = ("model", "workers", "generation")
GATEWAY_WORKER_KEYS = ("heartbeat_interval_s", "liveness", "probe_interval_s", "probe_timeout_s")


class WorkerGroup:
    """The workers, named w0, w1, ...; replaced one at a time by a reload."""

    def __init__(self, cfg: Config) -> None:
        self.procs: list[WorkerProcess] = [WorkerProcess(f"w{i}", cfg)
                                           for i in range(cfg.workers.count)]
        self.retiring: list[WorkerProcess] = []   # draining during a reload


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.gateway = ChildProcess("gateway", cfg)
        self.workers = WorkerGroup(cfg)
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.gw_status: dict[str, Any] = {}
        self.stopping = False
        self.reload_state: dict[str, Any] = {"state": "idle"}
        self._reload_task: asyncio.Task | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.gpu: gpu.GpuMonitor | None = None
        self._cpu: dict[str, float | None] = {}

    @property
    def children(self) -> list[ChildProcess]:
        return [self.gateway, *self.workers.procs]

    # ---- main loop --------------------------------------------------------------------
    async def run(self) -> None:
        self.ctx = zmq.asyncio.Context()
        # NVML or not, said once; cheap (no GGUF read) so status has it from the start.
        self.gpu = gpu.GpuMonitor(self.cfg.gpu, n_gpu_layers=self.cfg.model.n_gpu_layers)
        control = self.ctx.socket(zmq.REP)
        control.setsockopt(zmq.LINGER, 0)
        tasks: list[asyncio.Task] = []
        try:
            bind_private(control, self.cfg.control_endpoint)
            for child in self.children:
                await child.start()
            tasks = [asyncio.create_task(self._serve_control(control)),
                     asyncio.create_task(self._poll_gateway()),
                     asyncio.create_task(self._watch_vram())]
            while not self.stop_event.is_set():
                await self._reconcile()
                try:
                    await asyncio.wait_for(self.stop_event.wait(), TICK_S)
                except asyncio.TimeoutError:
                    pass
            await self._shutdown()
        finally:
            if self._reload_task is not None:
                self._reload_task.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            control.close(linger=0)
            for child in [*self.children, *self.workers.retiring]:
                if child.pid:   # on an exception path, leave nothing behind
                    await child.stop(self.cfg.control.stop_timeout_s)
            self.ctx.term()

    def _live(self) -> dict[int, dict[str, Any]]:
        """The gateway's view of its workers, by pid."""
        return {w["pid"]: w for w in self.gw_status.get("workers", [])}

    async def _reconcile(self) -> None:
        for child in self.children:
            if child.exited() and child is not self.gateway:
                await self._gateway_call({"cmd": "worker_exited", "worker": child.routing_id,
                                          "why": describe_exit(child.last_exit)}, timeout=0.5)
            await child.maybe_restart()
        gw = self.gw_status
        if gw.get("listening") and gw.get("pid") == self.gateway.pid:
            self.gateway.mark_ready()
        live = self._live()
        lost = {v["pid"]: (k, v["why"]) for k, v in self.gw_status.get("lost", {}).items()}
        for w in self.workers.procs:
            pid = w.pid
            if pid is None:
                continue
            if pid in lost and w.state in ("starting", "running"):
                log.error("%s (pid %d) is alive but the gateway declared it dead (%s): "
                          "killing it", w.name, pid, lost[pid][1])
                self._kill(w)
            elif w.state == "starting" and pid in live:
                w.state = "running"
                w.mark_ready()
            elif w.state == "starting" and w.uptime > self.cfg.workers.ready_timeout_s:
                log.error("%s sent no READY within %.0fs: killing it", w.name,
                          self.cfg.workers.ready_timeout_s)
                self._kill(w)

    @staticmethod
    def _kill(w: ChildProcess) -> None:
        try:
            assert w.proc is not None
            w.proc.kill()
        except ProcessLookupError:
            pass

    async def _shutdown(self) -> None:
        self.stopping = True
        c = self.cfg.control
        log.info("stopping: draining for up to %.1fs", c.drain_timeout_s)
        deadline = time.monotonic() + c.drain_timeout_s
        st = await self._gateway_call({"cmd": "drain"})
        while st and st.get("open", 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            st = await self._gateway_call({"cmd": "status"})
        if st and st.get("open", 0) > 0:
            log.warning("drain timeout: %d request(s) still open", st["open"])
        workers = [*self.workers.procs, *self.workers.retiring]
        await asyncio.gather(*(w.stop(c.stop_timeout_s) for w in workers))
        await self.gateway.stop(c.stop_timeout_s)
        log.info("all children stopped")

    # ---- rolling reload -----------------------------------------------------------------
    def start_reload(self) -> dict[str, Any]:
        if self._reload_task is not None and not self._reload_task.done():
            return {"ok": False, "error": "a reload is already running"}
        try:
            new = config_mod.load(self.cfg.source)
        except ConfigError as exc:
            return {"ok": False, "error": str(exc)}
        changed, not_applied = diff_configs(self.cfg, new)
        applied = {s: getattr(new, s) for s in ROLLING}
        if any(k.startswith("workers.") and k.split(".", 1)[1] in GATEWAY_WORKER_KEYS
               for k in not_applied):
            applied["workers"] = msgspec.structs.replace(
                new.workers, **{k: getattr(self.cfg.workers, k) for k in GATEWAY_WORKER_KEYS})
        target = msgspec.structs.replace(self.cfg, **applied)
        self.reload_state = {"state": "rolling", "changed": changed, "not_applied": not_applied,
                             "step": "", "error": None}
        self._reload_task = asyncio.create_task(self._roll(target))
        return {"ok": True, **self.reload_state}

    async def _roll(self, target: Config) -> None:
        try:
            if target.generation != self.cfg.generation:
                await self._gateway_call({"cmd": "set_defaults",
                                          "defaults": _defaults(target)})
            old = list(self.workers.procs)
            n = max(len(old), target.workers.count)
            for i in range(n):
                if i < target.workers.count:
                    self.reload_state["step"] = f"starting new w{i}"
                    new = WorkerProcess(f"w{i}", target)
                    await new.start()
                    if not await self._wait_ready(new):
                        tail = "\n".join(list(new.tail)[-10:])
                        await new.stop(self.cfg.control.stop_timeout_s)
                        raise RuntimeError(f"new w{i} did not become ready; last output:\n{tail}")
                    new.state = "running"
                    new.mark_ready()
                if i < len(old):
                    self.reload_state["step"] = f"draining old w{i}"
                    self.workers.retiring.append(old[i])
                    idx = self.workers.procs.index(old[i])
                    if i < target.workers.count:
                        self.workers.procs[idx] = new
                    else:
                        self.workers.procs.remove(old[i])
                    await self._retire(old[i])
                else:
                    self.workers.procs.append(new)
            self.cfg = target
            self.reload_state.update(state="done", step="")
            log.info("reload done: %s", ", ".join(self.reload_state["changed"]) or "no change")
        except Exception as exc:  # report it; the old workers keep serving
            log.error("reload failed: %s", exc)
            self.reload_state.update(state="failed", error=str(exc))

    async def _wait_ready(self, w: WorkerProcess) -> bool:
        deadline = time.monotonic() + self.cfg.workers.ready_timeout_s
        while time.monotonic() < deadline:
            if w.pid is None:
                return False
            st = await self._gateway_call({"cmd": "status"})
            if st and any(x["pid"] == w.pid for x in st.get("workers", [])):
                return True
            await asyncio.sleep(0.1)
        return False

    async def _wait_drained(self, w: WorkerProcess) -> None:
        deadline = time.monotonic() + self.cfg.control.drain_timeout_s
        while time.monotonic() < deadline:
            st = await self._gateway_call({"cmd": "status"})
            me = [x for x in (st or {}).get("workers", []) if x["pid"] == w.pid]
            if not me or me[0]["inflight"] + me[0].get("parked", 0) == 0:
                return
            await asyncio.sleep(0.1)

    async def _drain_and_stop(self, w: WorkerProcess, why: str) -> None:
        """Take no new work to ``w``, let it finish (bounded), stop it, forget it."""
        await self._gateway_call({"cmd": "drain_worker", "worker": w.routing_id})
        await self._wait_drained(w)
        await w.stop(self.cfg.control.stop_timeout_s)
        await self._gateway_call({"cmd": "worker_exited", "worker": w.routing_id, "why": why})

    async def _retire(self, w: WorkerProcess) -> None:
        await self._drain_and_stop(w, "retired by reload")
        self.workers.retiring.remove(w)

    # ---- GPU memory -----------------------------------------------------------------------
    async def _watch_vram(self) -> None:
        """Sample per-worker VRAM (NVML); act on a breach of the budget."""
        if self.gpu is None or not self.gpu.enforced:
            return
        # With a GPU, read the GGUF for the estimate (seconds: off the event loop).
        self.gpu = await asyncio.to_thread(gpu.GpuMonitor.for_config, self.cfg)
        while True:
            pids = {w.name: w.pid for w in self.workers.procs}
            for action in await asyncio.to_thread(self.gpu.poll, pids):
                if action.kind == "restart" and action.n_gpu_layers is not None:
                    await self._restart_with_layers(action.worker or "", action.n_gpu_layers)
            await asyncio.sleep(self.cfg.gpu.sample_interval_s)

    async def _restart_with_layers(self, name: str, layers: int) -> None:
        w = next((x for x in self.workers.procs if x.name == name), None)
        if w is None:
            return
        log.warning("restarting %s with n_gpu_layers=%d to get under the VRAM budget",
                    name, layers)
        w.cfg = msgspec.structs.replace(
            w.cfg, model=msgspec.structs.replace(w.cfg.model, n_gpu_layers=layers))
        await self._retire_in_place(w)

    async def _retire_in_place(self, w: WorkerProcess) -> None:
        """Drain a worker, stop it and start it again at once (not a crash)."""
        await self._drain_and_stop(w, "restarted by the VRAM governor")
        w.restarts += 1
        await w.start()

    # ---- the gateway's view -------------------------------------------------------------
    async def _gateway_call(self, req: dict[str, Any], timeout: float = 1.0) -> dict[str, Any] | None:
        if self.gateway.pid is None or self.ctx is None:
            return None
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.cfg.admin_endpoint)
            await sock.send_json(req)
            if await sock.poll(int(timeout * 1000)):
                return m.parse(await sock.recv())
            return None
        finally:
            sock.close(linger=0)

    async def _poll_gateway(self) -> None:
        """Keep the gateway's view here, and push the process figures there (the one
        place that aggregates metrics)."""
        me = psutil.Process()
        while True:
            st = await self._gateway_call({"cmd": "status"})
            self.gw_status = st or {}
            if st is not None:
                procs = {
                    "supervisor": {"pid": me.pid, "rss": me.memory_info().rss,
                                   "cpu": me.cpu_percent(None)},
                    "gateway": {"pid": self.gateway.pid, "rss": self.gateway.rss(),
                                "cpu": self.gateway.cpu_percent()},
                    "workers": [{"name": w.name, "pid": w.pid, "state": self._state_of(w),
                                 "restarts": w.restarts, "rss": w.rss(), "cpu": w.cpu_percent(),
                                 "vram_mib": self._vram_of(w)} for w in self.workers.procs],
                    "gpu": self.gpu.last if self.gpu else None,
                }
                self._cpu = {"supervisor": procs["supervisor"]["cpu"],
                             "gateway": procs["gateway"]["cpu"],
                             **{w["name"]: w["cpu"] for w in procs["workers"]}}
                await self._gateway_call({"cmd": "procs", "procs": procs}, timeout=0.5)
            await asyncio.sleep(STATUS_POLL_S)

    def _state_of(self, w: WorkerProcess) -> str:
        info = self._live().get(w.pid) if w.pid else None
        if w in self.workers.retiring:
            return "draining"
        return info["state"] if info and w.state == "running" else w.state

    def _vram_of(self, w: WorkerProcess) -> float | None:
        if self.gpu is None or not self.gpu.last.get("enforced"):
            return None
        return self.gpu.last["workers"].get(w.name)

    # ---- control socket -----------------------------------------------------------------
    async def _serve_control(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            raw = await sock.recv()
            try:
                reply = await self._command(m.parse(raw))
            except m.MessageError as exc:
                reply = {"ok": False, "error": str(exc)}
            await sock.send_json(reply)

    async def _command(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            fresh = await self._gateway_call({"cmd": "status"}, timeout=0.5)
            if fresh is not None:
                self.gw_status = fresh
            return {"ok": True, **self.status()}
        if cmd == "stop":
            self.stop_event.set()
            return {"ok": True, "stopping": True, "pid": os.getpid()}
        if cmd == "restart":
            names = req.get("workers") or [w.name for w in self.workers.procs]
            unknown = set(names) - {w.name for w in self.workers.procs}
            if unknown:
                return {"ok": False, "error": f"no such worker: {', '.join(sorted(unknown))}"}
            for w in self.workers.procs:
                if w.name in names:
                    w.reset()
            return {"ok": True, "restarted": names}
        if cmd == "reload":
            return self.start_reload()
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self) -> dict[str, Any]:
        gw = self.gw_status
        live = self._live()
        workers = []
        wm = gw.get("metrics", {}).get("workers", {})
        for w in [*self.workers.procs, *self.workers.retiring]:
            snap = w.snapshot()
            snap["id"] = snap.pop("name")
            info = live.get(w.pid) if w.pid else None
            if info and w.state == "running":
                snap.update({k: info[k] for k in ("slots", "credits", "inflight", "served",
                                                  "device", "kv_store")})
            else:
                snap.update({"inflight": 0, "credits": 0})
            snap["state"] = self._state_of(w)
            snap["vram_mib"] = self._vram_of(w)
            snap["cpu"] = self._cpu.get(w.name)
            snap["tokens_per_s"] = wm.get(w.name, {}).get("tokens_per_s", 0.0)
            workers.append(snap)
        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
            "config": self.cfg.source, "model": self.cfg.model.path,
            "stopping": self.stopping, "reload": self.reload_state,
            "gpu": self.gpu.last if self.gpu else None,
            "metrics": gw.get("metrics", {}),
            "free_credits": gw.get("free_credits", 0),
            "gateway": {**self.gateway.snapshot(), "listening": gw.get("listening", []),
                        "http_listening": gw.get("http_listening", []),
                        "metrics_url": gw.get("metrics_url", ""),
                        "queue": gw.get("queue", 0), "inflight": gw.get("inflight", 0),
                        "parked": gw.get("parked", 0),
                        "connections": gw.get("connections", 0),
                        "counters": gw.get("counters", {}), "errors": gw.get("errors", {})},
            "workers": workers,
        }


def _defaults(cfg: Config) -> dict[str, Any]:
    g = cfg.generation
    return {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "top_k": g.top_k, "deadline_ms": g.deadline_ms, "max_deadline_ms": g.max_deadline_ms}


def diff_configs(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(every changed key, the changed keys a rolling reload cannot apply)."""
    changed, not_applied = [], []
    for section in ("model", "workers", "generation", "gateway", "http", "control", "gpu"):
        a, b = getattr(old, section), getattr(new, section)
        for f in msgspec.structs.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                key = f"{section}.{f.name}"
                changed.append(key)
                if section not in ROLLING or (section == "workers"
                                              and f.name in GATEWAY_WORKER_KEYS):
                    not_applied.append(key)
    return changed, not_applied


def main(cfg: Config) -> int:
    """Run the supervisor in this process until SIGTERM/SIGINT or `llmctl stop`."""
    make_private(cfg.run_dir, cfg.log_dir)
    pidfile = cfg.pidfile
    pidfile.write_text(f"{os.getpid()}\n")
    sup = Supervisor(cfg)

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.stop_event.set)
        await sup.run()

    try:
        asyncio.run(_main())
    finally:
        for p in (pidfile, cfg.run_dir / "control.sock", cfg.run_dir / "gateway.sock",
                  cfg.run_dir / "workers.sock"):
            p.unlink(missing_ok=True)
    return 0
