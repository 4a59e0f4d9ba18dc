"""Admission queue, worker credits and failover decisions: pure state, no I/O.

Credit-based flow control (ZeroMQ guide, ch. 7): a worker's READY grants ``slots``
credits; each request dispatched to it spends one, and the worker's DONE or ERROR
for that request gives it back.  ``credits`` is derived (slots minus requests the
worker still holds), so it can never go negative or above the slots.  Requests wait
in one bounded queue until some worker has credit, and leave it in the ``[scheduling]``
policy's order (``fifo``: arrival; ``fair``: ``fairness.py``'s); the least recently
used worker with credit gets the next one, unless a worker with credit holds a longer prefix of
its prompt in its prompt cache (``prefix_hashes`` from its DONEs): the longest match
wins, LRU breaks ties.

A request whose worker dies before it produced a token goes back to the head of the
queue, at most ``MAX_DISPATCHES`` times in all: a request that kills every worker it
reaches ends in ``worker_failed`` instead of crash-looping them.

Parking: a request whose client stopped taking output (its token window spent) can be
parked by its worker: the worker keeps its state but frees its slot, so the credit
comes back (``park``).  When the client reads again the request waits for a credit of
that same worker (``want_resume``), ahead of new requests (``take_resumes``).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmctl.common.errors import NotReady, Overloaded, ShuttingDown
from llmctl.common.prefix import matched
from llmctl.dataplane.fairness import Fairness

if TYPE_CHECKING:
    from llmctl.dataplane.streams import Stream


MAX_DISPATCHES = 3      # a request is sent to a worker at most this often


@dataclass(eq=False)
class WorkerState:
    id: str                         # the ZeroMQ routing id (unique per spawn)
    slots: int
    name: str = ""                  # w0, w1, ...
    pid: int = 0
    model: str = ""
    device: str = "cpu"
    n_ctx: int = 0
    node: str = ""                  # the machine it runs on
    last_seen: float = field(default_factory=time.monotonic)
    last_dispatch: int = 0
    inflight: dict[int, Stream] = field(default_factory=dict)
    parked: dict[int, Stream] = field(default_factory=dict)   # held without a slot
    resumes: deque[Stream] = field(default_factory=deque)     # parked, client reads again
    served: int = 0
    draining: bool = False          # finishing what it has; gets nothing new
    last_busy: float = field(default_factory=time.monotonic)
    prefixes: set[int] = field(default_factory=set)     # prompt prefixes its cache holds
    kv_store: dict[str, int] = field(default_factory=dict)   # its host KV store, as last told
    threads: dict[str, Any] = field(default_factory=dict)    # its compute threads, as last told
    slot_tokens: list[int] = field(default_factory=list)     # tokens each slot's KV holds
    props: dict[str, Any] = field(default_factory=dict)      # its model's (READY)

    @property
    def credits(self) -> int:
        return self.slots - len(self.inflight)

    @property
    def available(self) -> int:
        """Credits the scheduler may spend now."""
        return 0 if self.draining else self.credits

    @property
    def state(self) -> str:
        return "draining" if self.draining else "ready" if self.credits else "busy"

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "pid": self.pid, "state": self.state,
                "slots": self.slots, "credits": self.credits, "inflight": len(self.inflight),
                "parked": len(self.parked), "served": self.served, "device": self.device, "model": self.model, "node": self.node,
                "kv_store": dict(self.kv_store), "threads": dict(self.threads),
                "last_seen_s": round(now - self.last_seen, 3)}


class Scheduler:
    """One model's admission: its queue bound, its workers' credits, its prefix routing.

    ``waits``: an on-demand model, whose requests may queue while no worker is ready
    (the supervisor loads it meanwhile); otherwise such a request is ``not_ready``."""

    def __init__(self, max_queue: int, model: str = "", waits: bool = False,
                 fairness: Fairness | None = None) -> None:
        self.max_queue = max_queue
        self.fairness = fairness
        self.model = model
        self.waits = waits
        self.last_used = 0.0            # monotonic time of the last admission (0 = never)
        self.wanted_at = 0.0            # when the supervisor was last asked to load it
        self.queue: deque[Stream] = deque()
        self.workers: dict[str, WorkerState] = {}
        self.draining = False
        self._tick = itertools.count(1)
        self._done_times: deque[float] = deque(maxlen=64)

    # ---- workers --------------------------------------------------------------------
    def add_worker(self, w: WorkerState) -> tuple[list[Stream], list[Stream]]:
        """A READY: a new worker, or a known one that restarted (its old work is lost)."""
        orphans = self.remove_worker(w.id)
        self.workers[w.id] = w
        return orphans

    def remove_worker(self, wid: str) -> tuple[list[Stream], list[Stream]]:
        """Forget a dead worker.  Returns (requeued, failed): requests that had sent
        nothing go back to the head of the queue; the others have failed."""
        w = self.workers.pop(wid, None)
        if w is None:
            return [], []
        requeued, failed = [], []
        for s in [*w.inflight.values(), *w.parked.values()]:
            s.worker = None
            s.parked = False
            if s.finished:
                continue
            if s.pieces == 0 and s.attempts < MAX_DISPATCHES:
                requeued.append(s)
            else:
                failed.append(s)
        for s in reversed(requeued):
            self.queue.appendleft(s)
        return requeued, failed

    @property
    def ready(self) -> bool:
        return any(not w.draining for w in self.workers.values())

    # ---- admission ------------------------------------------------------------------
    def admit(self, s: Stream) -> None:
        if self.draining:
            raise ShuttingDown("the server is draining for a stop")
        if not self.ready and not self.waits:
            raise NotReady(f"no worker of model {self.model!r} is ready" if self.model
                           else "no worker is ready")
        # Queued requests up to the free credits are about to be dispatched: they
        # do not count against max_queue.
        free = sum(w.available for w in self.workers.values())
        if len(self.queue) >= self.max_queue + free:
            what = f"the admission queue of model {self.model!r}" if self.model \
                else "the admission queue"
            raise Overloaded(f"{what} is full", retry_after_ms=self.retry_after_ms())
        s.model = self.model
        self.last_used = time.monotonic()
        self.queue.append(s)

    def retry_after_ms(self) -> int:
        """How long until a queue place is likely free, from the measured drain rate."""
        times = self._done_times
        if len(times) >= 2 and times[-1] > times[0]:
            per_request = (times[-1] - times[0]) / (len(times) - 1)
        else:
            per_request = 0.25
        return int(min(60_000, max(10, per_request * 1000)))

    def dequeue(self, s: Stream) -> bool:
        try:
            self.queue.remove(s)
            return True
        except ValueError:
            return False

    # ---- dispatch -------------------------------------------------------------------
    def take(self) -> list[tuple[WorkerState, Stream]]:
        """Pair queued requests with workers holding credit: the longest cached
        prefix of the prompt first, then LRU."""
        out = []
        while self.queue:
            candidates = [w for w in self.workers.values() if w.available > 0]
            if not candidates:
                break
            s = self.queue.popleft()
            if s.finished:
                continue
            w = min(candidates, key=lambda x: (-matched(s.prefix, x.prefixes), x.last_dispatch))
            self.assign(w, s)
            out.append((w, s))
        return out

    def dispatch(self, now: float) -> list[tuple[WorkerState, Stream, bool]]:
        """Everything that goes to a worker now: (worker, stream, resumed?).  ``fifo``:
        parked requests whose clients read again, then the queue in order; ``fair``: the
        waiting work in ``fairness.py``'s order, a parked request on its own worker."""
        fair = self.fairness
        if fair is None or not fair.fair:
            return [(w, s, True) for w, s in self.take_resumes()] + \
                [(w, s, False) for w, s in self.take()]
        out: list[tuple[WorkerState, Stream, bool]] = []
        while True:
            free = [w for w in self.workers.values() if w.available > 0]
            if not free:
                return out
            waiting = [s for s in self.queue if not s.finished]
            waiting += [s for w in free for s in w.resumes
                        if not s.finished and s.rid in w.parked]
            if not waiting:
                return out
            room = fair.starving_room(self.slots(), self.running()) > 0
            s = min(waiting, key=lambda x: fair.key(x, now, room))
            s.starved = room and fair.starving(s, now)
            if s.parked:
                w = self.workers[s.worker or ""]
                w.resumes.remove(s)
                self._resume(w, s)
                out.append((w, s, True))
            else:
                self.queue.remove(s)
                w = min(free, key=lambda x: (-matched(s.prefix, x.prefixes), x.last_dispatch))
                self.assign(w, s)
                out.append((w, s, False))
            s.slice_start = s.pieces

    def slots(self) -> int:
        return sum(w.slots for w in self.workers.values())

    def running(self) -> list[Stream]:
        """Requests in a slot now."""
        return [s for w in self.workers.values() for s in w.inflight.values()]

    def waiting(self) -> list[Stream]:
        """Requests waiting for a slot: queued, or parked and ready to resume."""
        return [s for s in self.queue if not s.finished] + [
            s for w in self.workers.values() for s in w.resumes
            if not s.finished and s.rid in w.parked]

    def preempt(self, now: float) -> list[tuple[WorkerState, Stream]]:
        """Running requests that yield their slots to waiting ones (``fairness.py``)."""
        fair = self.fairness
        if fair is None or not fair.fair or not self.queue and not any(
                w.resumes for w in self.workers.values()):
            return []
        waiting, everyone = self.waiting(), self.running()
        free = sum(w.available for w in self.workers.values()) + \
            sum(1 for s in everyone if s.park_sent)
        running = [s for w in self.workers.values() if not w.draining
                   for s in w.inflight.values()]
        room = fair.starving_room(self.slots(), everyone)
        out = []
        for s in fair.yields(waiting, running, free, now, room):
            s.park_sent = True
            s.yield_at = s.pieces
            out.append((self.workers[s.worker or ""], s))
        return out

    def _resume(self, w: WorkerState, s: Stream) -> None:
        w.parked.pop(s.rid, None)
        s.parked = False
        s.park_sent, s.yield_at = False, -1
        w.inflight[s.rid] = s
        w.last_busy = time.monotonic()

    def take_resumes(self) -> list[tuple[WorkerState, Stream]]:
        """Parked requests whose clients read again, each with a credit of its worker."""
        out = []
        for w in self.workers.values():
            while w.resumes and w.credits > 0:
                s = w.resumes.popleft()
                if s.finished or s.rid not in w.parked:
                    continue
                self._resume(w, s)
                out.append((w, s))
        return out

    def park(self, wid: str, rid: int) -> Stream | None:
        """The worker parked ``rid``: it keeps the request, its credit comes back."""
        w = self.workers.get(wid)
        s = w.inflight.pop(rid, None) if w else None
        if w is None or s is None:
            return None
        s.parked = True
        s.t_wait = time.monotonic()
        w.parked[rid] = s
        return s

    def want_resume(self, s: Stream) -> None:
        """A parked request's client took output: run it again when its worker can."""
        w = self.workers.get(s.worker or "")
        if w is not None and s.parked and s not in w.resumes:
            w.resumes.append(s)

    def assign(self, w: WorkerState, s: Stream) -> None:
        """Spend one of ``w``'s credits on ``s``."""
        assert w.credits > 0
        w.last_dispatch = next(self._tick)
        w.last_busy = time.monotonic()
        w.inflight[s.rid] = s
        s.worker = w.id
        s.attempts += 1

    def complete(self, wid: str, rid: int) -> Stream | None:
        """The worker ended ``rid`` (DONE or ERROR): its credit comes back."""
        w = self.workers.get(wid)
        if w is None:
            return None
        s = w.inflight.pop(rid, None) or w.parked.pop(rid, None)
        if s is not None:
            s.parked = False
            s.worker = None
            w.served += 1
            w.last_busy = time.monotonic()
            self._done_times.append(time.monotonic())
        return s

    # ---- deadlines ------------------------------------------------------------------
    def expire_queued(self, now: float) -> list[Stream]:
        expired = [r for r in self.queue if r.deadline <= now]
        for r in expired:
            self.queue.remove(r)
        return expired

    def held(self) -> list[Stream]:
        """Every request a worker holds, in a slot or parked."""
        return [r for w in self.workers.values()
                for r in (*w.inflight.values(), *w.parked.values()) if not r.finished]

    def expired_running(self, now: float) -> list[Stream]:
        return [r for r in self.held() if r.deadline <= now]

    def inflight_count(self) -> int:
        return sum(len(w.inflight) for w in self.workers.values())

    def parked_count(self) -> int:
        return sum(len(w.parked) for w in self.workers.values())

    def open_count(self) -> int:
        return len(self.queue) + len(self.held())


class Schedulers:
    """Every model's Scheduler, and the sums the status, /health and /metrics read."""

    def __init__(self, models: list[tuple[str, bool]], max_queue: int,
                 fairness: Fairness | None = None) -> None:
        self.by_model = {name: Scheduler(max_queue, name, waits, fairness)
                         for name, waits in models}
        self.default = next(iter(self.by_model.values()))
        self.max_queue = max_queue * len(self.by_model)

    def get(self, model: str) -> Scheduler | None:
        return self.by_model.get(model)

    def __iter__(self):
        return iter(self.by_model.values())

    @property
    def workers(self) -> dict[str, WorkerState]:
        return {wid: w for s in self.by_model.values() for wid, w in s.workers.items()}

    @property
    def queue(self) -> list[Stream]:
        return [r for s in self.by_model.values() for r in s.queue]

    @property
    def draining(self) -> bool:
        return self.default.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        for s in self.by_model.values():
            s.draining = value

    @property
    def ready(self) -> bool:
        return any(s.ready for s in self.by_model.values())

    def inflight_count(self) -> int:
        return sum(s.inflight_count() for s in self.by_model.values())

    def parked_count(self) -> int:
        return sum(s.parked_count() for s in self.by_model.values())

    def open_count(self) -> int:
        return sum(s.open_count() for s in self.by_model.values())
