"""The supervisor: a reconcile loop over its child processes.

Desired state: one gateway, and the workers ``Rollout`` wants (``workers.count`` of them,
each on its desired config).  Every tick the loop compares that with what runs:

* what died is restarted (``ChildProcess``'s policy: backoff forever for what had been
  ready, FATAL for what never gets ready);
* readiness and loss are events the gateway pushes over the link (``gwlink.py``): a
  worker's READY reached it, a worker it declared dead (the supervisor kills a hung
  process that still runs), a drained worker;
* the gateway is pinged every heartbeat interval: one that was ready and stops
  answering for ``workers.liveness`` intervals (hung, SIGSTOP) is killed and restarted;
* ``Rollout.step`` converges the workers to their desired configs, one at a time; a
  reload (``reload.py``) and the VRAM governor's restart are nothing but new desired
  states;
* the served models' states follow what runs (``ModelManager``): every tick, and at
  once when a worker gets ready, so that a model is ``loaded`` before any answer of its
  worker can reach a client.

It answers the CLI on its control socket; what it reports is assembled in ``status.py``.
Asking the gateway first (``Status``, ``Models``) orders the answer after every event the
gateway sent before: one pipe, read in order, each event applied as it is read.

On a node (``[node] join``) there is no gateway: the workers connect to the head's, and
each tells this supervisor how its link stands (``admin.LinkReport`` on ``node.sock``);
restart policy, logs and the VRAM governor are the same.  On a head, ``status`` also
lists the workers of other machines that the gateway serves.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from llmctl.common import admin
from llmctl.common.config import Config
from llmctl.common.procs import bind_private, describe_exit, make_private
from llmctl.control import gpu, node, status
from llmctl.control.child import ChildProcess, WorkerProcess
from llmctl.control.gwlink import GatewayLink
from llmctl.control.models import ModelManager, Refusal, memory_plan, plan_budget
from llmctl.control.reload import Reload
from llmctl.control.rollout import Rollout
from llmctl.control.states import ProcessState

log = logging.getLogger(__name__)

TICK_S = 0.2
PROCS_EVERY_S = 0.5          # process figures pushed to the gateway (/metrics)


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.gateway = ChildProcess("gateway", cfg)
        self.gateway_up: admin.GatewayUp | None = None     # its addresses, once it listens
        self.rollout = Rollout(cfg, drain=self._drain_worker, forget=self._forget)
        # The served models: which are loaded (the plan is computed in run()).
        self.models = ModelManager(cfg, {}, 0.0)
        self.models.planned = False
        self.rollout.want_workers(self.models.desired_workers())
        self.usage: dict[str, Any] = {}           # the gateway's last per-model figures
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.stopping = False
        self.reload = Reload()
        self.link: GatewayLink | None = None
        self.gpu: gpu.GpuMonitor | None = None
        self.cpu: dict[str, float | None] = {}    # CPU % per process (the last figures)
        self._last_ping = self._last_procs = 0.0

    @property
    def workers(self) -> list[WorkerProcess]:
        return self.rollout.all()

    @property
    def children(self) -> list[ChildProcess]:
        return self.workers if self.cfg.is_node else [self.gateway, *self.workers]

    # ---- main loop --------------------------------------------------------------------
    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        # NVML or not, said once; cheap (no GGUF read) so status has it from the start.
        self.gpu = gpu.GpuMonitor(self.cfg.gpu, n_gpu_layers=self.cfg.model.n_gpu_layers)
        control = ctx.socket(zmq.REP)
        control.setsockopt(zmq.LINGER, 0)
        self.link = GatewayLink(ctx, self.cfg.link_endpoint, self._on_event)
        reports = ctx.socket(zmq.PULL)
        reports.setsockopt(zmq.LINGER, 0)
        tasks: list[asyncio.Task] = []
        try:
            bind_private(control, self.cfg.control_endpoint)
            self.link.bind()
            tasks = [asyncio.create_task(c) for c in (self._serve_control(control),
                                                      self.link.run(), self._watch_vram())]
            # The plan's figures take seconds (GGUF reads): off the loop, beside the start;
            # no on-demand load is decided under a budget before they are known.
            self.models.budget_mib, self.models.kind = await asyncio.to_thread(
                plan_budget, self.cfg)
            if self.models.budget_mib:      # figures only where a budget is enforced:
                tasks.append(asyncio.create_task(self._plan(self.cfg)))   # see _plan
            else:
                self.models.planned = True
            if self.cfg.is_node:          # no gateway here: the workers join the head
                bind_private(reports, self.cfg.node_endpoint)
                tasks.append(asyncio.create_task(node.serve_reports(
                    reports, self._by_routing_id, self._models_follow)))
                log.info("node %s: workers join %s", self.cfg.node_name, self.cfg.node.join)
            else:
                await self.gateway.start()
                self.link.expect(self.gateway.pid)
            await self.rollout.step()            # the workers start with the gateway
            while not self.stop_event.is_set():
                await self._reconcile()
                try:
                    await asyncio.wait_for(self.stop_event.wait(), TICK_S)
                except asyncio.TimeoutError:
                    pass
            await self._shutdown()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            control.close(linger=0)
            reports.close(linger=0)
            self.link.close()
            for child in self.children:
                if child.pid:   # on an exception path, leave nothing behind
                    await child.stop(self.cfg.control.stop_timeout_s)
            ctx.term()

    async def _reconcile(self) -> None:
        assert self.link is not None
        for child in self.children:
            if child.exited() and child is not self.gateway:
                self._forget(child, describe_exit(child.last_exit))
            restarted = child.state is ProcessState.BACKOFF
            await child.maybe_restart()
            if restarted and child is self.gateway and child.pid:
                self.link.expect(child.pid)
        now = time.monotonic()
        for w in self.workers:
            if w.state is ProcessState.STARTING and w.pid \
                    and w.uptime > self.cfg.workers.ready_timeout_s:
                log.error("%s sent no READY within %.0fs: killing it", w.name,
                          self.cfg.workers.ready_timeout_s)
                w.kill()
        self._check_gateway(now)
        await self._step_models(now)
        await self.rollout.step()
        if (target := self.reload.track(self.rollout)) is not None:
            self.cfg = target
        if now - self._last_procs >= PROCS_EVERY_S:
            self._last_procs = now
            figures = status.procs(self)
            self.cpu = {"supervisor": figures["supervisor"]["cpu"],
                        "gateway": figures["gateway"]["cpu"],
                        **{w["name"]: w["cpu"] for w in figures["workers"]}}
            self.link.tell(admin.Procs(procs=figures))

    async def _plan(self, cfg: Config | None = None) -> None:
        """The plan's figures: from run_dir's cache (``llmctl start`` computed them), else
        from the GGUFs.  Not without a budget: GGUFReader maps the file, and a GGUF
        truncated while it is read (replaced, or a test breaking it) is a SIGBUS that
        would take the supervisor down."""
        cfg = cfg or self.cfg
        needs, budget, kind = await asyncio.to_thread(memory_plan, cfg)
        self.models.configure(cfg, needs)
        self.models.planned = True
        if budget:
            log.info("memory plan (%s): budget %.0f MiB; %s", kind, budget, ", ".join(
                f"{n} {v:.0f} MiB" if v is not None else f"{n} unknown"
                for n, v in needs.items()))

    async def _step_models(self, now: float) -> None:
        """The served models' desired state: loads asked for, evictions, keep_alive_s."""
        usage = await self._gateway_usage()
        self._refuse(self.models.step(now, *self._processes_of_models(), usage))
        ro = self.rollout
        desired = self.models.desired_workers()
        if set(desired) != set(ro.desired):     # a model loads or unloads (the configs of
            ro.want_workers({n: ro.desired.get(n, c)    # the others stay as they are:
                             for n, c in desired.items()})   # a reload, the governor)

    async def _gateway_usage(self) -> dict[str, Any] | None:
        """The gateway's per-model figures now (None: no gateway answered)."""
        if self.gateway_up is None or self.link is None:
            return None
        reply = await self.link.call(admin.Models(), timeout=0.5)
        if reply is None:
            return None
        self.usage = reply.data
        return reply.data

    def _processes_of_models(self) -> tuple[dict[str, bool], dict[str, bool], dict[str, str]]:
        """What ``ModelManager`` moves the states by: which workers are ready, which
        processes exist, which workers are FATAL and why."""
        ro = self.rollout
        ready = {n: w.was_ready and w.pid is not None and w.state is ProcessState.RUNNING
                 for n, w in ro.workers.items()}
        running = {w.name: True for w in ro.all()}
        fatal = {n: "\n".join(list(w.tail)[-5:]) or "it never got ready"
                 for n, w in ro.workers.items() if w.state is ProcessState.FATAL}
        return ready, running, fatal

    def _models_follow(self) -> None:
        """A worker got ready: the models' states follow now, not on the next tick."""
        self._refuse(self.models.observe(time.monotonic(), *self._processes_of_models()))

    def _refuse(self, refusals: list[Refusal]) -> None:
        """Tell the gateway which models' queued requests get an error."""
        assert self.link is not None
        for r in refusals:
            self.link.tell(admin.ModelUnavailable(model=r.model, code=r.code, message=r.message,
                                                  retry_after_ms=r.retry_after_ms))

    def _check_gateway(self, now: float) -> None:
        """Ping the gateway; kill one that was ready and stopped answering (hung)."""
        assert self.link is not None
        gw, w = self.gateway, self.cfg.workers
        if gw.pid is None:
            return
        if now - self._last_ping >= w.heartbeat_interval_s:
            self._last_ping = now
            self.link.tell(admin.Ping())
        silent = now - self.link.last_heard
        if gw.was_ready and silent > w.heartbeat_interval_s * w.liveness:
            log.error("the gateway (pid %d) answered nothing for %.1fs: killing it",
                      gw.pid, silent)
            gw.kill()
        elif not gw.was_ready and gw.uptime > self.cfg.control.start_timeout_s:
            log.error("the gateway did not come up within %.0fs: killing it",
                      self.cfg.control.start_timeout_s)
            gw.kill()

    def _on_event(self, ev: admin.FromGateway) -> None:
        """Something the gateway pushed: it is up, a worker is ready, lost or drained."""
        match ev:
            case admin.GatewayUp():
                self.gateway.mark_ready()
                self.gateway_up = ev
            case admin.WorkerReady(worker=wid):
                w = self._by_routing_id(wid)
                if w is not None and w.state is ProcessState.STARTING:
                    w.to(ProcessState.RUNNING)
                    w.mark_ready()
                    self._models_follow()
            case admin.WorkerLost(worker=wid, pid=pid, why=why):
                w = self._by_routing_id(wid)
                if w is not None and w.pid == pid and w.state in (ProcessState.STARTING,
                                                                  ProcessState.RUNNING):
                    log.error("%s (pid %d) is alive but the gateway declared it dead (%s): "
                              "killing it", w.name, pid, why)
                    w.kill()
            case admin.WorkerDrained(worker=wid):
                w = self._by_routing_id(wid)
                if w is not None:
                    w.drained = True
            case admin.ModelWanted(model=name):
                self.models.want(name)
            case admin.ModelUnwanted(model=name):
                err = self.models.unload(name)
                if err is not None:
                    log.warning("unload %s (asked over HTTP): %s", name, err)

    def _by_routing_id(self, wid: str) -> WorkerProcess | None:
        return next((w for w in self.workers if w.routing_id == wid), None)

    def _drain_worker(self, w: WorkerProcess) -> None:
        if self.cfg.is_node:            # the head's gateway is told by the worker itself
            node.drain(w)
            return

        async def drain() -> None:
            assert self.link is not None
            reply = await self.link.call(admin.DrainWorker(worker=w.routing_id))
            if reply is None or not reply.ok:     # the gateway does not know it: nothing runs
                w.drained = True
        asyncio.create_task(drain())

    def _forget(self, w: ChildProcess, why: str) -> None:
        if self.link is not None:
            self.link.tell(admin.WorkerExited(worker=w.routing_id, why=why))

    async def _shutdown(self) -> None:
        assert self.link is not None
        self.stopping = True
        c = self.cfg.control
        log.info("stopping: draining for up to %.1fs", c.drain_timeout_s)
        deadline = time.monotonic() + c.drain_timeout_s
        reply = await self.link.call(admin.Drain())
        while reply and reply.data.get("open", 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            reply = await self.link.call(admin.Status())
        if reply and reply.data.get("open", 0) > 0:
            log.warning("drain timeout: %d request(s) still open", reply.data["open"])
        if self.cfg.is_node:            # no gateway here: each worker drains itself
            for w in self.workers:
                w.drained = False
                node.drain(w)
            while not all(w.drained or w.pid is None for w in self.workers) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if not all(w.drained or w.pid is None for w in self.workers):
                log.warning("drain timeout: a worker still holds requests")
        await asyncio.gather(*(w.stop(c.stop_timeout_s) for w in self.workers))
        await self.gateway.stop(c.stop_timeout_s)
        log.info("all children stopped")

    # ---- reload: a new desired state ----------------------------------------------------
    def start_reload(self) -> dict[str, Any]:
        """`llmctl reload`: converge to the config file's content (``reload.py``)."""
        error = self.reload.begin(self.cfg)
        if error is not None:
            return {"ok": False, "error": error}
        target = self.reload.target
        assert target is not None
        old = (self.cfg.generation, self.cfg.scheduling, self.cfg.tenants)
        if (target.generation, target.scheduling, target.tenants) != old \
                and self.link is not None:
            self.link.tell(admin.Reconfigure(generation=target.generation,
                                             scheduling=target.scheduling,
                                             tenants=target.tenants))
        # The old figures until the new ones are read (off the loop).
        self.models.configure(target, {n: m.need_mib for n, m in self.models.models.items()})
        if self.models.budget_mib:
            asyncio.create_task(self._plan(target))
        self.rollout.want_workers(self.models.desired_workers())
        self.rollout.failed = None
        return {"ok": True, **self.reload.view()}

    # ---- GPU memory -----------------------------------------------------------------------
    async def _watch_vram(self) -> None:
        """Sample per-worker VRAM (NVML); a breach may ask for a worker with fewer layers."""
        if self.gpu is None or not self.gpu.enforced or self.cfg.model.engine == "synthetic":
            return
        # With a GPU, read the GGUF for the estimate (seconds: off the event loop).
        self.gpu = await asyncio.to_thread(gpu.GpuMonitor.for_config, self.cfg)
        while True:
            pids = {w.name: w.pid for w in self.rollout.workers.values()}
            for action in await asyncio.to_thread(self.gpu.poll, pids):
                w = self.rollout.workers.get(action.worker or "")
                if action.kind == "restart" and action.n_gpu_layers is not None and w:
                    log.warning("restarting %s with n_gpu_layers=%d to get under the VRAM "
                                "budget", w.name, action.n_gpu_layers)
                    self.rollout.want_one(w.name, msgspec.structs.replace(
                        w.cfg, model=msgspec.structs.replace(
                            w.cfg.model, n_gpu_layers=action.n_gpu_layers)))
            await asyncio.sleep(self.cfg.gpu.sample_interval_s)

    # ---- control socket -----------------------------------------------------------------
    async def _serve_control(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            raw = await sock.recv()
            try:
                cmd = admin.decode_command(raw)
            except admin.AdminError as exc:
                await sock.send(admin.reply_json(False, error=str(exc)))
                continue
            await sock.send(admin.reply_json(**await self._command(cmd)))

    async def _command(self, cmd: admin.Command) -> dict[str, Any]:
        match cmd:
            case admin.Status():
                assert self.link is not None
                reply = await self.link.call(admin.Status(), timeout=0.5)
                return {"ok": True, **status.status(self, reply.data if reply else {})}
            case admin.Stop():
                self.stop_event.set()
                return {"ok": True, "stopping": True, "pid": os.getpid()}
            case admin.Restart(workers=names):
                known = {w.name for w in self.workers}
                names = names or sorted(known)
                if unknown := set(names) - known:
                    return {"ok": False, "error": f"no such worker: {', '.join(sorted(unknown))}"}
                for w in self.workers:
                    if w.name in names:
                        w.reset()
                return {"ok": True, "restarted": names}
            case admin.Reload():
                return self.start_reload()
            case admin.Models():
                await self._gateway_usage()
                return {"ok": True, "models": status.model_rows(self)}
            case admin.Load(model=name):
                err = self.models.want(name)
                return {"ok": err is None, "error": err, "models": status.model_rows(self)}
            case admin.Unload(model=name):
                err = self.models.unload(name)
                return {"ok": err is None, "error": err, "models": status.model_rows(self)}
        return {"ok": False, "error": f"{type(cmd).__name__} is not a command of the CLI"}


def run_files(cfg: Config) -> list[Path]:
    """What a running supervisor keeps in run_dir: its pidfile and its sockets."""
    return [cfg.pidfile, *(cfg.run_dir / f"{name}.sock"
                           for name in ("control", "link", "workers", "node"))]


def main(cfg: Config) -> int:
    """Run the supervisor in this process until SIGTERM/SIGINT or `llmctl stop`."""
    make_private(cfg.run_dir, cfg.log_dir)
    cfg.pidfile.write_text(f"{os.getpid()}\n")
    sup = Supervisor(cfg)

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.stop_event.set)
        await sup.run()

    try:
        asyncio.run(_main())
    finally:
        for p in run_files(cfg):
            p.unlink(missing_ok=True)
    return 0
