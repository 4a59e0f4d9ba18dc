"""Supervised child processes: spawn, capture output, restart policy.

``ChildProcess`` runs one process with ``die_with_parent`` (no orphans), pumps its
stdout+stderr into ``run_dir/logs/NAME.log`` (rotated) and keeps the tail for
``llmctl status``.  ``exited()`` applies the restart policy: exponential backoff
(reset after ``stable_after_s`` of uptime), FATAL after more than ``max_restarts``
crashes within ``restart_window_s``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import logging.handlers
import os
import sys
import time
from collections import deque
from typing import Any

import psutil

from control.config import Config
from control.procs import CONFIG_JSON_ENV, describe_exit, die_with_parent, terminate

log = logging.getLogger(__name__)

TAIL_LINES = 40
_SPAWN_IDS = itertools.count(1)


class ChildProcess:
    """One supervised process and its restart policy (this class: the gateway)."""

    initial_state = "running"

    def __init__(self, name: str, cfg: Config) -> None:
        self.name = name
        self.cfg = cfg
        self.spawns = 0
        self._spawn_id = 0
        self._psutil: psutil.Process | None = None
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

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "dataplane"]

    @property
    def routing_id(self) -> str:
        """The ZeroMQ identity of this spawn, unique within the supervisor, so that an
        old and a new process of the same name coexist during a rolling reload."""
        return f"{self.name}.{self._spawn_id}"

    def _ps(self) -> psutil.Process | None:
        pid = self.pid
        if pid is None:
            return None
        if self._psutil is None or self._psutil.pid != pid:
            try:
                self._psutil = psutil.Process(pid)
            except psutil.Error:
                return None
        return self._psutil

    def rss(self) -> int | None:
        ps = self._ps()
        try:
            return ps.memory_info().rss if ps else None
        except psutil.Error:
            return None

    def cpu_percent(self) -> float | None:
        """CPU use since the previous call (psutil's interval=None semantics)."""
        ps = self._ps()
        try:
            return ps.cpu_percent(None) if ps else None
        except psutil.Error:
            return None

    async def start(self) -> None:
        self.spawns += 1
        self._spawn_id = next(_SPAWN_IDS)
        env = dict(os.environ)
        env[CONFIG_JSON_ENV] = self.cfg.to_json()
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        self.state = self.initial_state
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
        return {"name": self.name, "pid": self.pid, "state": self.state, "rss": self.rss(),
                "uptime_s": round(self.uptime, 3), "restarts": self.restarts,
                "last_exit": describe_exit(self.last_exit) if self.last_exit is not None else None,
                "stderr_tail": list(self.tail)[-10:] if self.state in ("fatal", "backoff")
                else []}




class WorkerProcess(ChildProcess):
    """A worker: 'starting' until the gateway has its READY."""

    initial_state = "starting"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "worker", "--id", self.routing_id,
                "--endpoint", self.cfg.workers_endpoint]
