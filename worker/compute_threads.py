"""How many threads a worker's llama.cpp context computes with: as many as get a CPU.

ggml's CPU backend splits each operation of a graph between its threads and joins them
at a barrier after it (a few hundred barriers per token for a small model).  A thread
that reaches a barrier first spins until the others arrive: libgomp spins ~300,000
times before it sleeps, ggml's own threadpool never sleeps.  That is the fastest way
while every thread has a core.  When the threads get fewer cores than they are, the
spinning thread burns the time slice its partner needs, and every barrier costs a time
slice (4 ms) instead of microseconds.  This happens as soon as anything else wants the
CPU: Linux gives each session (autogroup) or cgroup an equal share, so one CPU-bound
process in another session leaves a service in its own session (a daemon, a systemd
unit) one core for its two compute threads, and a token takes seconds instead of
milliseconds (docs/benchmarks.md, "Sharing the host").

Policy ``[host] threads_policy = "adaptive"`` (the default): after its engine steps, at
most every ``WINDOW_S``, the worker reads the run time and run-queue wait of its own
threads (``/proc/self/task/*/schedstat``).  n threads that were on a CPU a share s of the
time they wanted one got n x s CPUs' worth; when that is less than n - ``ROUND_UP``
(two threads that got under 1.2 CPUs: they time-share one core) and they lost whole time
slices (``SLICE_WAIT_MS`` per wait on average: brief preemptions by the service's own
gateway and I/O threads are not that), the worker computes with floor(n x s + ROUND_UP)
threads (``llama_set_n_threads``).  With
fewer than its maximum it watches the idle time of the CPUs it may run on
(``/proc/stat``): a CPU idle most of the time (``IDLE_FOR_RAISE``) for ``hold`` seconds
(beyond what its own threads left idle) gives it one thread back.  A raise that is taken back within ``FLAP_S`` doubles
``hold`` (up to ``HOLD_MAX_S``), so an intermittent neighbour cannot make it oscillate
at the price of a slow step each time.  ``"fixed"`` always computes with ``threads``.

The maximum is ``[model] threads`` (0: the CPUs this process may use divided by the
workers), capped by the CPUs of its affinity mask and its cgroup's CPU quota.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmctl.common.procs import thread_times

log = logging.getLogger(__name__)

WINDOW_S = 0.5          # the run/wait figures are judged over at least this much time
ROUND_UP = 0.8          # n threads that got c CPUs' worth: keep floor(c + ROUND_UP) of them
SLICE_WAIT_MS = 1.0     # ... if each wait lasts this long on average: time slices lost to
                        # other processes, not brief preemptions by the service's own wake-ups
IDLE_FOR_RAISE = 0.75   # CPU-seconds idle per second, over ``hold``: one more thread
HOLD_S = 1.0            # how long the idle CPU must last before a raise (first time)
HOLD_MAX_S = 60.0
FLAP_S = 10.0           # a drop this soon after a raise doubles the hold
BUSY_MIN = 0.1          # windows where the threads wanted less CPU than this are not judged


@dataclass(frozen=True)
class CpuSample:
    """The process's threads' CPU time and run-queue wait (ns) and time slices, summed,
    and the idle CPU-seconds of the CPUs it may run on, at ``t`` (monotonic seconds)."""
    t: float
    run_ns: int
    wait_ns: int
    idle_s: float
    slices: int = 0


_TICK = os.sysconf("SC_CLK_TCK")


def _idle_seconds(cpus: frozenset[int]) -> float:
    """Idle + iowait seconds of ``cpus`` since boot (``/proc/stat``'s cpuN lines)."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            if name != "cpu" and int(name[3:]) in cpus:
                total += int(values[3]) + int(values[4])
    return total / _TICK


def read_sample() -> CpuSample:
    times = thread_times().values()
    run, wait, slices = (sum(t[i] for t in times) for i in (1, 2, 3))
    return CpuSample(time.monotonic(), run, wait,
                     _idle_seconds(frozenset(os.sched_getaffinity(0))), slices)


def usable_cpus() -> int:
    """CPUs this process can compute on: its affinity mask, capped by its cgroup's CPU
    quota (cgroup v2 ``cpu.max``), if it has one."""
    n = len(os.sched_getaffinity(0))
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split(":", 2)[2]
        quota, period = (Path("/sys/fs/cgroup") / cgroup.lstrip("/") / "cpu.max") \
            .read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError, IndexError):
        pass
    return n


class ThreadGovernor:
    """Chooses a context's compute thread count (``n``) and applies it through ``apply``."""

    def __init__(self, apply: Callable[[int], None], n_max: int, adaptive: bool = True,
                 sample: Callable[[], CpuSample] = read_sample,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._apply = apply
        self.n_max = max(1, n_max)
        self.n = self.n_max
        self.adaptive = adaptive
        self.changes = 0
        self._sample = sample
        self._clock = clock
        self._last = sample() if adaptive else None
        self.hold_s = HOLD_S
        self._idle_since: float | None = None
        self._raised_at = -math.inf

    @property
    def policy(self) -> str:
        return "adaptive" if self.adaptive else "fixed"

    def after_step(self) -> None:
        """Called after each engine step: judge the last window once it is long enough."""
        last = self._last
        if last is None or self._clock() - last.t < WINDOW_S:
            return
        now = self._sample()
        self._last = now
        wall = now.t - last.t
        run, wait = now.run_ns - last.run_ns, now.wait_ns - last.wait_ns
        busy = run + wait
        if self.n > 1 and busy >= BUSY_MIN * wall * 1e9:
            share = run / busy
            slice_wait_ms = wait / max(1, now.slices - last.slices) / 1e6
            target = max(1, int(self.n * share + ROUND_UP))
            if target < self.n and slice_wait_ms >= SLICE_WAIT_MS:
                if now.t - self._raised_at < FLAP_S:
                    self.hold_s = min(HOLD_MAX_S, self.hold_s * 2)
                self._set(target, f"its threads ran {100 * share:.0f}% of the time they "
                                  f"were runnable, waiting {slice_wait_ms:.1f} ms a time slice: "
                                  "the CPU is shared with other processes")
                return
        if self.n < self.n_max:
            # CPUs idle beyond those our own threads left idle (they did not want all n
            # of theirs while the worker waited for work): another thread would get one.
            idle = (now.idle_s - last.idle_s) / wall - max(0.0, self.n - busy / (wall * 1e9))
            if idle < IDLE_FOR_RAISE:
                self._idle_since = None
            elif self._idle_since is None:
                self._idle_since = last.t
            elif now.t - self._idle_since >= self.hold_s:
                self._raised_at = now.t
                self._set(self.n + 1, f"{idle:.2f} CPU idle for {now.t - self._idle_since:.1f}s")
        elif now.t - self._raised_at > HOLD_MAX_S:
            self.hold_s = HOLD_S         # stable at the maximum: forget old flapping

    def _set(self, n: int, why: str) -> None:
        log.info("compute threads %d -> %d: %s", self.n, n, why)
        self.n = n
        self.changes += 1
        self._idle_since = None
        self._apply(n)
        self._last = self._sample()      # the window of a change is not judged

    def info(self) -> dict[str, object]:
        return {"n": self.n, "max": self.n_max, "policy": self.policy, "changes": self.changes}
