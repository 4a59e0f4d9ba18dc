"""The workers' desired state, and the one mechanism that converges to it.

The supervisor keeps, for every worker name (``w0``, ``w1``, ...), the config it must run.
A reload sets a new desired config for all of them; the VRAM governor sets one worker's
(fewer GPU layers).  ``Rollout.step()``, called on every reconcile tick, compares what
runs with what is desired and replaces at most one worker at a time:

* **surge** (a reload: no request may see a gap): start the new process beside the old
  one, wait for its READY, then drain the old one (the gateway gives it nothing new and
  says when it holds nothing, or ``drain_timeout_s`` passes) and stop it;
* **in place** (the governor: the old process must free its GPU memory first): drain
  the old one, stop it, then start the new one.

A replacement's phase is a ``states.RolloutPhase``.  A worker that is missing is
started; one that is no longer wanted is drained and stopped.  A new process that dies
or sends no READY within ``ready_timeout_s`` aborts a surge: the old one keeps serving,
and the desired state goes back to what runs.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from llmctl.common.config import Config
from llmctl.control.child import WorkerProcess
from llmctl.control.states import RolloutPhase, move

log = logging.getLogger(__name__)


@dataclass
class Replacement:
    name: str
    old: WorkerProcess | None
    new: WorkerProcess | None
    surge: bool
    phase: RolloutPhase = RolloutPhase.STARTING       # changed by ``to`` only
    since: float = field(default_factory=time.monotonic)
    stopper: asyncio.Task | None = None

    def __str__(self) -> str:
        return f"the replacement of {self.name}"

    def to(self, phase: RolloutPhase) -> None:
        self.phase, self.since = move(self, self.phase, phase), time.monotonic()


class Rollout:
    def __init__(self, cfg: Config, drain: Callable[[WorkerProcess], None],
                 forget: Callable[[WorkerProcess, str], None],
                 spawn: Callable[[str, Config], WorkerProcess] = WorkerProcess) -> None:
        self.cfg = cfg
        self.spawn = spawn                           # a worker process, not yet started
        self.workers: dict[str, WorkerProcess] = {}  # name -> the process serving it
        self.desired: dict[str, Config] = {}
        self.in_place: set[str] = set()              # names to replace without a surge
        self.retiring: list[WorkerProcess] = []      # old processes being drained
        self.current: Replacement | None = None
        self.drain, self.forget = drain, forget      # tell the gateway
        self.failed: str | None = None               # why the last surge was aborted

    # ---- what is wanted --------------------------------------------------------------
    def want_workers(self, desired: dict[str, Config]) -> None:
        """Exactly these workers (the models loaded or loading), each on its config: the
        names new here start, the ones gone are drained and stopped, a changed config is
        replaced with a surge (a reload)."""
        keep_in_place = {n for n in self.in_place if n in desired and self.desired.get(n) ==
                         desired[n]}
        self.desired = dict(desired)
        self.in_place = keep_in_place

    def want_one(self, name: str, cfg: Config) -> None:
        """One worker on ``cfg``, replaced in place (the governor)."""
        if name in self.desired:
            self.desired[name] = cfg
            self.in_place.add(name)

    @property
    def converged(self) -> bool:
        """Every wanted worker runs its desired config and has been ready; nothing else runs."""
        return self.current is None and not self.retiring \
            and set(self.workers) == set(self.desired) \
            and all(self.workers[n].cfg == c and self.workers[n].was_ready
                    for n, c in self.desired.items())

    def step_text(self) -> str:
        r = self.current
        if r is None:
            return ""
        return f"{r.phase.value} {'new' if r.phase is RolloutPhase.STARTING else 'old'} {r.name}"

    # ---- one tick --------------------------------------------------------------------
    async def step(self) -> None:
        if self.current is not None:
            await self._advance(self.current)
            return
        for name in sorted(set(self.workers) - set(self.desired)):     # no longer wanted
            self.current = Replacement(name, self.workers.pop(name), None, surge=False,
                                       phase=RolloutPhase.DRAINING)
            self._retire(self.current.old)
            return
        for name, cfg in sorted(self.desired.items()):
            w = self.workers.get(name)
            if w is None:
                new = self.spawn(name, cfg)
                await new.start()
                self.workers[name] = new
            elif w.cfg != cfg:
                surge = name not in self.in_place
                self.current = Replacement(name, w, None, surge=surge, phase=(
                    RolloutPhase.STARTING if surge else RolloutPhase.DRAINING))
                if surge:
                    self.current.new = self.spawn(name, cfg)
                    await self.current.new.start()
                else:
                    self.workers.pop(name)
                    self._retire(w)
                return

    async def _advance(self, r: Replacement) -> None:
        c = self.cfg
        if r.phase is RolloutPhase.STARTING:
            new = r.new
            assert new is not None
            if new.was_ready:
                if r.old is not None and r.surge:
                    self.workers[r.name] = new       # it serves; the old one goes
                    r.to(RolloutPhase.DRAINING)
                    self._retire(r.old)
                else:
                    self.workers[r.name] = new
                    self._done(r)
            elif new.pid is None or time.monotonic() - r.since > c.workers.ready_timeout_s:
                self._abort(r, f"new {r.name} did not become ready; last output:\n"
                               + "\n".join(list(new.tail)[-10:]))
        elif r.phase is RolloutPhase.DRAINING:
            old = r.old
            assert old is not None
            if old.drained or old.pid is None or \
                    time.monotonic() - r.since > c.control.drain_timeout_s:
                r.to(RolloutPhase.STOPPING)
                r.stopper = asyncio.create_task(old.stop(c.control.stop_timeout_s))
        elif r.phase is RolloutPhase.STOPPING and r.stopper is not None and r.stopper.done():
            old = r.old
            assert old is not None
            self.forget(old, "retired by reload" if r.surge else "replaced in place")
            self.retiring.remove(old)
            if r.surge or r.name not in self.desired:
                self._done(r)
            else:                                    # in place: now start the new one
                r.new = self.spawn(r.name, self.desired[r.name])
                await r.new.start()
                r.to(RolloutPhase.STARTING)
                r.old = None
                self.in_place.discard(r.name)

    def _retire(self, w: WorkerProcess) -> None:
        w.drained = False
        self.retiring.append(w)
        self.drain(w)

    def _done(self, r: Replacement) -> None:
        log.info("%s now runs its desired config", r.name)
        self.current = None

    def _abort(self, r: Replacement, why: str) -> None:
        log.error("%s", why)
        assert r.new is not None
        asyncio.create_task(r.new.stop(self.cfg.control.stop_timeout_s))
        # What runs keeps serving, and is what is wanted now (no retry loop).
        self.desired = {n: self.workers[n].cfg if n in self.workers else cfg
                        for n, cfg in self.desired.items()}
        self.failed = why
        self.current = None

    def all(self) -> list[WorkerProcess]:
        """Every worker process, serving, starting or retiring."""
        extra = [self.current.new] if self.current and self.current.new and \
            self.current.new is not self.workers.get(self.current.name) else []
        return [*self.workers.values(), *extra, *self.retiring]
