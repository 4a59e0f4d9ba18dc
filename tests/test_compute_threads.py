"""worker/compute_threads.py: how many threads a worker computes with (pure decisions on
made-up scheduler figures), and once on the real model beside real CPU-bound processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmctl.worker import compute_threads as ct
from llmctl.worker.compute_threads import CpuSample, ThreadGovernor


class FakeCpu:
    """A clock and cumulative scheduler figures that a test advances window by window."""

    def __init__(self) -> None:
        self.t, self.run, self.wait, self.idle, self.slices = 100.0, 0, 0, 0.0, 0

    def sample(self) -> CpuSample:
        return CpuSample(self.t, self.run, self.wait, self.idle, self.slices)

    def window(self, seconds: float, run_cpus: float, wait_cpus: float, idle_cpus: float,
               slice_wait_ms: float = 4.0) -> None:
        """``seconds`` pass; the worker's threads ran ``run_cpus`` CPUs' worth, waited for
        ``wait_cpus``, ``slice_wait_ms`` a time slice; the machine had ``idle_cpus`` idle."""
        self.t += seconds
        self.run += int(run_cpus * seconds * 1e9)
        self.wait += int(wait_cpus * seconds * 1e9)
        self.idle += idle_cpus * seconds
        self.slices += max(1, int(wait_cpus * seconds * 1e3 / slice_wait_ms))


def governor(n_max: int = 2, adaptive: bool = True) -> tuple[ThreadGovernor, FakeCpu, list[int]]:
    cpu, applied = FakeCpu(), []
    gov = ThreadGovernor(applied.append, n_max, adaptive, sample=cpu.sample, clock=lambda: cpu.t)
    return gov, cpu, applied


def test_threads_that_wait_for_a_cpu_half_the_time_become_one():
    gov, cpu, applied = governor()
    cpu.window(0.6, run_cpus=1.9, wait_cpus=0.05, idle_cpus=0.05)   # alone: stays at 2
    gov.after_step()
    assert gov.n == 2 and applied == []
    cpu.window(0.6, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)     # a neighbour came
    gov.after_step()
    assert gov.n == 1 and applied == [1] and gov.changes == 1


def test_brief_preemptions_by_the_services_own_threads_are_not_a_neighbour():
    """Eight HTTP clients on two cores: the gateway and the load generator wake up per
    token and take the compute threads' CPU for a fraction of a millisecond each time."""
    gov, cpu, applied = governor()
    cpu.window(0.6, run_cpus=1.45, wait_cpus=0.55, idle_cpus=0.0, slice_wait_ms=0.3)
    gov.after_step()
    assert gov.n == 2 and applied == []


def test_two_threads_that_got_most_of_two_cpus_stay_two():
    """Losing whole slices 30% of the time still leaves 1.4 CPUs: more than one thread
    computes with (the load generator of a benchmark on the same two cores does this)."""
    gov, cpu, applied = governor()
    cpu.window(0.6, run_cpus=1.4, wait_cpus=0.6, idle_cpus=0.0, slice_wait_ms=3.0)
    gov.after_step()
    assert gov.n == 2 and applied == []


def test_a_window_is_judged_only_once_it_is_long_enough():
    gov, cpu, applied = governor()
    cpu.window(0.2, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)
    gov.after_step()
    assert gov.n == 2
    cpu.window(0.4, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)
    gov.after_step()
    assert gov.n == 1


def test_many_threads_drop_to_the_cpus_they_got():
    gov, cpu, applied = governor(n_max=8)
    cpu.window(1.0, run_cpus=4.0, wait_cpus=4.0, idle_cpus=0.0)      # 8 threads got 4 CPUs
    gov.after_step()
    assert gov.n == 4


def test_an_idle_worker_is_not_judged_on_its_waits():
    gov, cpu, _ = governor()
    cpu.window(5.0, run_cpus=0.01, wait_cpus=0.04, idle_cpus=1.9)
    gov.after_step()
    assert gov.n == 2


def test_one_more_thread_once_a_cpu_stays_idle_for_the_hold():
    gov, cpu, applied = governor()
    cpu.window(0.6, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)
    gov.after_step()
    assert gov.n == 1
    cpu.window(0.6, run_cpus=1.0, wait_cpus=0.0, idle_cpus=0.0)      # neighbour still there
    gov.after_step()
    assert gov.n == 1
    for _ in range(3):                                               # it left: a CPU idles
        cpu.window(0.6, run_cpus=1.0, wait_cpus=0.0, idle_cpus=0.95)
        gov.after_step()
    assert gov.n == 2 and applied == [1, 2]


def test_the_cpu_our_own_idle_threads_leave_is_not_a_free_cpu():
    """One thread beside a neighbour, the worker waiting for requests half of the time:
    its own CPU idles, the neighbour's does not; no second thread for that."""
    gov, cpu, _ = governor()
    cpu.window(0.6, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)
    gov.after_step()
    for _ in range(20):
        cpu.window(0.6, run_cpus=0.5, wait_cpus=0.0, idle_cpus=0.5)
        gov.after_step()
    assert gov.n == 1


def test_a_raise_taken_back_soon_doubles_the_hold():
    gov, cpu, _ = governor()
    holds = []
    for _ in range(3):     # an intermittent neighbour: gone for a while, back at once
        cpu.window(0.6, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)
        gov.after_step()
        assert gov.n == 1
        while gov.n == 1:
            cpu.window(0.6, run_cpus=1.0, wait_cpus=0.0, idle_cpus=1.0)
            gov.after_step()
        holds.append(gov.hold_s)
    assert holds == [ct.HOLD_S, 2 * ct.HOLD_S, 4 * ct.HOLD_S]
    for _ in range(int(ct.HOLD_MAX_S / 0.6) + 2):        # stable at the maximum: forgotten
        cpu.window(0.6, run_cpus=1.9, wait_cpus=0.02, idle_cpus=0.05)
        gov.after_step()
    assert gov.n == 2 and gov.hold_s == ct.HOLD_S


def test_fixed_policy_never_changes():
    gov, cpu, applied = governor(adaptive=False)
    cpu.window(1.0, run_cpus=1.0, wait_cpus=1.0, idle_cpus=0.0)
    gov.after_step()
    assert gov.n == 2 and applied == [] and gov.info()["policy"] == "fixed"


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= ct.usable_cpus() <= len(os.sched_getaffinity(0))


# ---- the real model ---------------------------------------------------------------------

@pytest.mark.integration
def test_real_engine_computes_with_one_thread_beside_busy_processes():
    """Two threads on two CPUs with two CPU-bound processes in other sessions: the engine
    drops to one thread (more load on the machine only makes the waits longer).  The
    engine and the neighbours are pinned to the same two CPUs, whatever the machine has;
    then, told that a CPU is idle, the same engine computes with two threads again."""
    from llmctl.common.request import GenRequest
    from llmctl.worker.batch import BatchEngine
    from tests.service import MODEL

    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    hogs: list[subprocess.Popen] = []
    try:
        eng = BatchEngine(str(MODEL), 512, 0, 2, 63, slots=1)
        assert eng.threads.n == 2 and eng.threads.policy == "adaptive"

        def generate_until(cond, limit_s: float) -> bool:
            import time
            end = time.monotonic() + limit_s
            rid = 0
            while time.monotonic() < end:
                rid += 1
                eng.start(eng.prepare(rid, GenRequest(prompt="The sea is", max_tokens=32)))
                while eng.running:
                    eng.step()
                    if cond():
                        eng.cancel(rid)
                        return True
            return False

        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                 start_new_session=True) for _ in cpus]
        for h in hogs:
            os.sched_setaffinity(h.pid, cpus)
        assert generate_until(lambda: eng.threads.n == 1, 120), "never dropped to one thread"
        for h in hogs:
            h.kill()
            h.wait()
        hogs = []
        real = eng.threads._sample

        def a_cpu_idles() -> CpuSample:      # the hold's idle CPU, whatever else runs here
            got = real()
            return CpuSample(got.t, got.run_ns, got.wait_ns, got.t * 2, got.slices)

        eng.threads._sample = a_cpu_idles
        eng.threads._last = a_cpu_idles()
        assert generate_until(lambda: eng.threads.n == 2, 60), "never took the second back"
        assert eng.threads.changes == 2
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        os.sched_setaffinity(0, saved)
