"""Supervised child processes: spawn, capture output, restart policy.

``ChildProcess`` runs one process with ``die_with_parent`` (no orphans), pumps its
stdout+stderr into ``run_dir/logs/NAME.log`` (rotated) and keeps the tail for
``llmctl status``.  ``exited()`` applies the restart policy of a service:

* a process that dies after it was ready (served) is restarted for as long as it
  takes, with capped exponential backoff (``backoff_initial_s`` doubling up to
  ``backoff_max_s``; reset after ``stable_after_s`` of uptime), like a crash-loop
  backoff: an OOM killer or an operator's kill never makes a service give up;
* only a process that keeps dying before it was ever ready (a model that cannot
  load, a port taken) is FATAL: more than ``max_restarts`` such failures within
  ``restart_window_s``, or at once when it exits ``EXIT_CONFIG`` (it refused its
  configuration, e.g. a draft model of another vocabulary).
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

from llmctl.common.config import Config
from llmctl.common.procs import (CONFIG_JSON_ENV, EXIT_CONFIG, describe_exit, die_with_parent,
                                 terminate)
from llmctl.control.states import ProcessState, move

log = logging.getLogger(__name__)

TAIL_LINES = 40
_SPAWN_IDS = itertools.count(1)


class ChildProcess:
    """One supervised process and its restart policy (this class: the gateway)."""

    initial_state = ProcessState.RUNNING

    def __init__(self, name: str, cfg: Config) -> None:
        self.name = name
        self.cfg = cfg
        self._spawn_id = 0
        self._psutil: psutil.Process | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._state = ProcessState.STOPPED
        self.restarts = 0
        self._started_mono = 0.0
        self.last_exit: int | None = None
        self.crashes: deque[float] = deque()     # failures before READY, in the window
        self.failures_in_row = 0
        self.was_ready = False                    # this spawn got ready (has served)
        self.drained = False                      # told to drain, it holds no request
        self.backoff_s = 0.0                      # the delay of the pending restart
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

    def __str__(self) -> str:
        return f"process {self.routing_id}"

    @property
    def state(self) -> ProcessState:
        return self._state

    def to(self, state: ProcessState) -> None:
        """Move to ``state`` (``states.move``: a transition its table lacks is logged)."""
        self._state = move(self, self._state, state)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_mono if self.pid else 0.0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "llmctl.dataplane"]

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
        self._spawn_id = next(_SPAWN_IDS)
        self.proc = await self._spawn()
        self.to(self.initial_state)
        self.was_ready = False
        self._started_mono = time.monotonic()
        self._pump = asyncio.create_task(self._pump_output(self.proc))
        log.info("%s started: pid %d", self.name, self.proc.pid)

    async def _spawn(self) -> asyncio.subprocess.Process:
        """The process of this spawn, its stdout+stderr a pipe (``argv()``)."""
        env = dict(os.environ)
        env[CONFIG_JSON_ENV] = self.cfg.to_json()
        env["PYTHONUNBUFFERED"] = "1"
        return await asyncio.create_subprocess_exec(
            *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, preexec_fn=die_with_parent)

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            self.tail.append(text)
            self._log.info(text)

    def mark_ready(self) -> None:
        """This spawn is ready (READY reached the gateway; the gateway listens): from
        now on its deaths are restarted forever, and earlier load failures forgotten."""
        if not self.was_ready:
            self.was_ready = True
            self.crashes.clear()

    def exited(self) -> bool:
        """Notice an exit once; True if the process just died unexpectedly."""
        if self.proc is None or self.proc.returncode is None or self.state in (
                ProcessState.BACKOFF, ProcessState.FATAL, ProcessState.STOPPED):
            return False
        c = self.cfg.control
        now = time.monotonic()
        self.last_exit = self.proc.returncode
        if now - self._started_mono >= c.stable_after_s:
            self.failures_in_row = 0
        self.failures_in_row += 1
        if not self.was_ready:
            self.crashes.append(now)
            while self.crashes and now - self.crashes[0] > c.restart_window_s:
                self.crashes.popleft()
            if len(self.crashes) > c.max_restarts or self.last_exit == EXIT_CONFIG:
                self.to(ProcessState.FATAL)
                log.error("%s is FATAL: failed %d times before it was ever ready, within "
                          "%.0fs; last: %s", self.name, len(self.crashes), c.restart_window_s,
                          describe_exit(self.last_exit))
                return True
        self.backoff_s = min(c.backoff_max_s,
                             c.backoff_initial_s * 2 ** min(self.failures_in_row - 1, 60))
        self.to(ProcessState.BACKOFF)
        self.next_start = now + self.backoff_s
        log.warning("%s died (%s)%s; restarting in %.2fs", self.name,
                    describe_exit(self.last_exit),
                    " after it had been ready" if self.was_ready else " before it was ready",
                    self.backoff_s)
        return True

    async def maybe_restart(self) -> None:
        if self.state is ProcessState.BACKOFF and time.monotonic() >= self.next_start:
            self.restarts += 1
            await self.start()

    async def stop(self, timeout: float) -> None:
        self.to(ProcessState.STOPPED)
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
        if self.state is ProcessState.FATAL:
            self.to(ProcessState.BACKOFF)
            self.next_start = 0.0

    def snapshot(self) -> dict[str, Any]:
        backoff = {"backoff_s": round(self.backoff_s, 3),
                   "restart_in_s": round(max(0.0, self.next_start - time.monotonic()), 3),
                   "failures_in_row": self.failures_in_row} \
            if self.state is ProcessState.BACKOFF else {}
        return {"id": self.name, "pid": self.pid, "state": self.state.value, "rss": self.rss(),
                "uptime_s": round(self.uptime, 3), "restarts": self.restarts, **backoff,
                "last_exit": describe_exit(self.last_exit) if self.last_exit is not None else None,
                "stderr_tail": list(self.tail)[-10:]
                if self.state in (ProcessState.FATAL, ProcessState.BACKOFF) else []}

    def kill(self) -> None:
        """SIGKILL (a hung process); its exit is noticed and handled like any other."""
        try:
            if self.proc is not None:
                self.proc.kill()
        except ProcessLookupError:
            pass


class WorkerProcess(ChildProcess):
    """A worker: ``starting`` until the gateway has its READY."""

    initial_state = ProcessState.STARTING

    link = ""            # a node's worker: its link to the head (admin.LinkState)
    link_detail = ""

    @property
    def routing_id(self) -> str:
        """On a node, prefixed by the node's name: unique across the cluster."""
        rid = super().routing_id
        return f"{self.cfg.node_name}/{rid}" if self.cfg.is_node else rid

    async def start(self) -> None:
        self.link = self.link_detail = ""
        await super().start()

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "llmctl.worker", "--id", self.routing_id,
                "--endpoint", self.cfg.worker_endpoint]
        return [*argv, "--report", self.cfg.node_endpoint] if self.cfg.is_node else argv
