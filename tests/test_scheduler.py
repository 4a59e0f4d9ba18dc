"""Credit accounting and failover decisions of the scheduler (pure state)."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.common.errors import NotReady, Overloaded, ShuttingDown
from llmctl.common.request import GenRequest
from llmctl.dataplane.scheduler import Scheduler, WorkerState
from llmctl.dataplane.streams import Stream
from tests.fakes import Recorder

REQUEST = GenRequest(prompt="x", max_tokens=1, deadline_ms=10_000)


def req() -> Stream:
    return Stream(request=REQUEST, out=Recorder())


def test_admission_limits():
    s = Scheduler(max_queue=1)
    with pytest.raises(NotReady):
        s.admit(req())
    s.add_worker(WorkerState("w0", slots=1))
    s.admit(req())          # about to take the free credit: not counted against the queue
    s.admit(req())          # queued
    with pytest.raises(Overloaded) as exc:
        s.admit(req())
    assert exc.value.retry_after_ms and exc.value.retry_after_ms > 0
    assert len(s.take()) == 1 and s.workers["w0"].credits == 0
    with pytest.raises(Overloaded):
        s.admit(req())      # one running, one queued: full
    s.complete("w0", next(iter(s.workers["w0"].inflight)))
    s.admit(req())          # a credit came back: room again
    s.draining = True
    with pytest.raises(ShuttingDown):
        s.admit(req())


def test_lru_dispatch_spreads_over_workers():
    s = Scheduler(max_queue=10)
    for w in ("w0", "w1"):
        s.add_worker(WorkerState(w, slots=2))
    for _ in range(4):
        s.admit(req())
    order = [w.id for w, _ in s.take()]
    assert order == ["w0", "w1", "w0", "w1"]


def test_failover_requeues_unstarted_and_fails_started():
    s = Scheduler(max_queue=10)
    s.add_worker(WorkerState("w0", slots=2))
    a, b = req(), req()
    s.admit(a)
    s.admit(b)
    s.take()
    b.pieces = 3
    requeued, failed = s.remove_worker("w0")
    assert requeued == [a] and failed == [b] and list(s.queue) == [a]


ops = st.lists(st.tuples(st.sampled_from(["admit", "take", "finish", "cancel", "die", "ready",
                                          "token"]),
                         st.integers(0, 2), st.integers(0, 50)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_credit_accounting_invariants(script):
    """Credits never negative, never above the slots, all back after any interleaving
    of finish, cancel and worker death; every request ends exactly once."""
    s = Scheduler(max_queue=5)
    slots = {"w0": 1, "w1": 2, "w2": 3}
    ended: dict[int, int] = {}
    admitted: list[Stream] = []

    def end(r: Stream) -> None:
        assert not r.finished
        r.finished = True
        ended[r.rid] = ended.get(r.rid, 0) + 1

    for op, wi, k in script:
        wid = f"w{wi}"
        if op == "ready":
            requeued, failed = s.add_worker(WorkerState(wid, slots=slots[wid]))
            for r in failed:
                end(r)
        elif op == "admit":
            r = req()
            try:
                s.admit(r)
                admitted.append(r)
            except (NotReady, Overloaded):
                pass
        elif op == "take":
            s.take()
        elif op == "token":
            w = s.workers.get(wid)
            if w and w.inflight:
                list(w.inflight.values())[k % len(w.inflight)].pieces += 1
        elif op == "finish":
            w = s.workers.get(wid)
            if w and w.inflight:
                rid = list(w.inflight)[k % len(w.inflight)]
                r = s.complete(wid, rid)
                if r is not None and not r.finished:
                    end(r)
        elif op == "cancel" and admitted:
            r = admitted[k % len(admitted)]
            if not r.finished:
                s.dequeue(r)
                end(r)      # the worker still holds it until it confirms
        elif op == "die":
            _, failed = s.remove_worker(wid)
            for r in failed:
                end(r)
        for w in s.workers.values():
            assert 0 <= w.credits <= w.slots
    # Drain: every worker confirms everything it holds; the queue then empties.
    for _ in range(100):
        for w in list(s.workers.values()):
            for rid in list(w.inflight):
                r = s.complete(w.id, rid)
                if r is not None and not r.finished:
                    end(r)
        if not s.queue or not s.workers:
            break
        s.take()
    for w in s.workers.values():
        assert w.credits == w.slots
    for r in list(s.queue):
        s.dequeue(r)
        end(r)
    assert all(ended.get(r.rid) == 1 for r in admitted)


def test_a_request_that_kills_every_worker_is_failed_after_max_dispatches():
    from llmctl.dataplane.scheduler import MAX_DISPATCHES
    s = Scheduler(max_queue=10)
    r = req()
    s.add_worker(WorkerState("w0", slots=1))
    s.admit(r)
    for attempt in range(1, MAX_DISPATCHES + 1):
        [(w, taken)] = s.take()
        assert taken is r and r.attempts == attempt
        requeued, failed = s.remove_worker(w.id)       # it died before the first token
        if attempt < MAX_DISPATCHES:
            assert requeued == [r] and failed == []
            s.add_worker(WorkerState(f"w{attempt}", slots=1))
        else:
            assert requeued == [] and failed == [r]
    assert not s.queue


def test_parking_gives_the_credit_back_and_resume_takes_it_first():
    s = Scheduler(max_queue=10)
    s.add_worker(WorkerState("w0", slots=1))
    stalled, waiting = req(), req()
    s.admit(stalled)
    [(w, _)] = s.take()
    s.admit(waiting)
    assert s.take() == [] and w.credits == 0
    assert s.park("w0", stalled.rid) is stalled and stalled.parked
    assert w.credits == 1 and stalled.worker == "w0"
    assert [r for _, r in s.take()] == [waiting]          # the slot serves the next one
    s.want_resume(stalled)
    assert s.take_resumes() == []                          # no credit yet
    s.complete("w0", waiting.rid)
    assert [r for _, r in s.take_resumes()] == [stalled] and not stalled.parked
    assert w.credits == 0 and stalled.rid in w.inflight
    # A parked request of a dead worker that had produced output has failed.
    assert s.park("w0", stalled.rid) is stalled
    stalled.pieces = 3
    assert s.remove_worker("w0") == ([], [stalled])
