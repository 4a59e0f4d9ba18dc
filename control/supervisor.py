"""The supervisor: a reconcile loop over its child processes.

Desired state: one gateway and ``workers.count`` workers, all running.  Every tick
the loop compares that with what runs, restarts what died (exponential backoff,
reset after a stable period), and gives up on what flaps (FATAL, with the last
lines of its stderr kept for ``llmctl status``).  Readiness comes from the gateway:
a worker is ready once it has sent READY there.
"""
from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import signal
import stat
import sys
import time
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from control.config import Config
from control.procs import CONFIG_JSON_ENV, describe_exit, die_with_parent, terminate
from dataplane import messages as m

log = logging.getLogger(__name__)

TAIL_LINES = 40
TICK_S = 0.2
STATUS_POLL_S = 0.5


class ChildProcess:
    """One supervised process (the gateway, or a worker) and its restart policy."""

    def __init__(self, name: str, argv: list[str], cfg: Config) -> None:
        self.name = name
        self.argv = argv
        self.cfg = cfg
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "stopped"          # starting | running | backoff | fatal | stopped
        self.restarts = 0
        self.started_at = 0.0           # wall clock, for display
        self._started_mono = 0.0
        self.last_exit: int | None = None
        self.crashes: deque[float] = deque()
        self.failures_in_row = 0
        self.next_start = 0.0
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._pump: asyncio.Task | None = None
        self._log = self._make_log()

    def _make_log(self) -> logging.Logger:
        c = self.cfg.control
        lg = logging.Logger(f"child.{self.name}")
        handler = logging.handlers.RotatingFileHandler(
            self.cfg.log_dir / f"{self.name}.log", maxBytes=c.log_max_bytes,
            backupCount=c.log_backups)
        handler.setFormatter(logging.Formatter("%(message)s"))
        lg.addHandler(handler)
        return lg

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_mono if self.pid else 0.0

    async def start(self) -> None:
        env = dict(os.environ)
        env[CONFIG_JSON_ENV] = self.cfg.to_json()
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        self.state = "starting" if self.name != "gateway" else "running"
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self._pump = asyncio.create_task(self._pump_output(self.proc))
        log.info("%s started: pid %d", self.name, self.proc.pid)

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            self.tail.append(text)
            self._log.info(text)

    def exited(self) -> bool:
        """Notice an exit once; True if the process just died unexpectedly."""
        if self.proc is None or self.proc.returncode is None or self.state in ("backoff", "fatal",
                                                                                "stopped"):
            return False
        c = self.cfg.control
        now = time.monotonic()
        self.last_exit = self.proc.returncode
        if now - self._started_mono >= c.stable_after_s:
            self.failures_in_row = 0
        self.failures_in_row += 1
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > c.restart_window_s:
            self.crashes.popleft()
        if len(self.crashes) > c.max_restarts:
            self.state = "fatal"
            log.error("%s is FATAL: %d crashes within %.0fs; last: %s", self.name,
                      len(self.crashes), c.restart_window_s, describe_exit(self.last_exit))
            return True
        delay = min(c.backoff_max_s, c.backoff_initial_s * 2 ** (self.failures_in_row - 1))
        self.state = "backoff"
        self.next_start = now + delay
        log.warning("%s died (%s); restarting in %.2fs", self.name,
                    describe_exit(self.last_exit), delay)
        return True

    async def maybe_restart(self) -> None:
        if self.state == "backoff" and time.monotonic() >= self.next_start:
            self.restarts += 1
            await self.start()

    async def stop(self, timeout: float) -> None:
        self.state = "stopped"
        if self.proc is not None:
            self.last_exit = await terminate(self.proc, timeout)
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump, 1.0)
            except asyncio.TimeoutError:
                self._pump.cancel()

    def reset(self) -> None:
        """`llmctl restart`: forget the crash history of a FATAL process."""
        self.crashes.clear()
        self.failures_in_row = 0
        if self.state == "fatal":
            self.state = "backoff"
            self.next_start = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "state": self.state,
                "uptime_s": round(self.uptime, 3), "restarts": self.restarts,
                "last_exit": describe_exit(self.last_exit) if self.last_exit is not None else None,
                "stderr_tail": list(self.tail)[-10:] if self.state in ("fatal", "backoff")
                else []}


class WorkerGroup:
    """The workers: ``count`` of them, named w0, w1, ..."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.procs = [
            ChildProcess(f"w{i}", [sys.executable, "-m", "worker", "--id", f"w{i}",
                                   "--endpoint", cfg.workers_endpoint], cfg)
            for i in range(cfg.workers.count)]


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.gateway = ChildProcess("gateway", [sys.executable, "-m", "dataplane"], cfg)
        self.workers = WorkerGroup(cfg)
        self.started = time.time()
        self.stop_event = asyncio.Event()
        self.gw_status: dict[str, Any] = {}
        self.stopping = False
        self.ctx: zmq.asyncio.Context | None = None

    @property
    def children(self) -> list[ChildProcess]:
        return [self.gateway, *self.workers.procs]

    # ---- main loop --------------------------------------------------------------------
    async def run(self) -> None:
        self.ctx = zmq.asyncio.Context()
        control = self.ctx.socket(zmq.REP)
        control.setsockopt(zmq.LINGER, 0)
        tasks: list[asyncio.Task] = []
        try:
            sock_path = self.cfg.run_dir / "control.sock"
            control.bind(self.cfg.control_endpoint)
            os.chmod(sock_path, stat.S_IRUSR | stat.S_IWUSR)
            for child in self.children:
                await child.start()
            tasks = [asyncio.create_task(self._serve_control(control)),
                     asyncio.create_task(self._poll_gateway())]
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
            for child in self.children:   # on an exception path, leave nothing behind
                if child.pid:
                    await child.stop(self.cfg.control.stop_timeout_s)
            self.ctx.term()

    async def _reconcile(self) -> None:
        for child in self.children:
            if child.exited() and child is not self.gateway:
                await self._gateway_call({"cmd": "worker_exited", "worker": child.name,
                                          "why": describe_exit(child.last_exit)}, timeout=0.5)
            await child.maybe_restart()
        ready = {w["id"] for w in self.gw_status.get("workers", [])}
        for w in self.workers.procs:
            if w.state == "starting" and w.name in ready:
                w.state = "running"
            elif w.state == "starting" and w.uptime > self.cfg.workers.ready_timeout_s:
                log.error("%s sent no READY within %.0fs: killing it", w.name,
                          self.cfg.workers.ready_timeout_s)
                assert w.proc is not None
                w.proc.kill()

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
        await asyncio.gather(*(w.stop(c.stop_timeout_s) for w in self.workers.procs))
        await self.gateway.stop(c.stop_timeout_s)
        log.info("all children stopped")

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
        while True:
            st = await self._gateway_call({"cmd": "status"})
            self.gw_status = st or {}
            await asyncio.sleep(STATUS_POLL_S)

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
            for w in self.workers.procs:
                if w.name in names:
                    w.reset()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self) -> dict[str, Any]:
        gw = self.gw_status
        by_id = {w["id"]: w for w in gw.get("workers", [])}
        workers = []
        for w in self.workers.procs:
            snap = w.snapshot()
            live = by_id.get(w.name)
            if live and w.state == "running" and live.get("pid") == w.pid:
                snap.update({k: live[k] for k in ("slots", "credits", "inflight", "served",
                                                  "device")})
                snap["state"] = live["state"]
            else:
                snap.update({"inflight": 0, "credits": 0})
            snap["id"] = snap.pop("name")
            workers.append(snap)
        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
            "config": self.cfg.source, "model": self.cfg.model.path,
            "stopping": self.stopping,
            "gateway": {**self.gateway.snapshot(), "listening": gw.get("listening", []),
                        "queue": gw.get("queue", 0), "inflight": gw.get("inflight", 0),
                        "connections": gw.get("connections", 0),
                        "counters": gw.get("counters", {}), "errors": gw.get("errors", {})},
            "workers": workers,
        }


def main(cfg: Config) -> int:
    """Run the supervisor in this process until SIGTERM/SIGINT or `llmctl stop`."""
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
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
