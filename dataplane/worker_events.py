"""The half of the gateway's core that takes the workers' messages (``WorkerEvents``, a
mixin of ``gateway.Gateway``, whose state it reads and writes): READY, the tokens and
logprobs of a round (rendered by each stream's front and written by its channel), the
ends (DONE, ERROR, PARKED), a worker lost (what it held re-queued or failed), a drain.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from llmctl.common import admin, messages as m
from llmctl.common.errors import WorkerFailed, from_code
from llmctl.dataplane.scheduler import MAX_DISPATCHES, Scheduler, Schedulers, WorkerState
from llmctl.dataplane.streams import Stream

log = logging.getLogger(__name__)

# Worker messages that only carry output: nothing for the worker link to send follows from
# them (the credit they earn is sent when the client takes them), so they do not wake it.
_OUTPUT_ONLY = (m.Token, m.Logprobs)
YIELD_GRACE = 8          # tokens after a PARK to yield that say the worker could not park it


class WorkerEvents:
    # Gateway's state that this half reads and writes (see gateway.Gateway.__init__).
    sched: Schedulers
    _of: dict[str, Scheduler]
    counters: Any
    metrics: Any
    events: Any
    wake: Any
    window: int
    grant_batch: int
    def knows(self, wid: str) -> bool:
        return wid in self._of

    def assign(self, w: WorkerState, s: Stream) -> None:
        """Give ``s`` to ``w`` outside the queue (a deep probe)."""
        self._of[w.id].assign(w, s)

    def _worker(self, wid: str) -> WorkerState | None:
        sched = self._of.get(wid)
        return sched.workers.get(wid) if sched is not None else None

    def on_worker(self, wid: str, msg: m.FromWorker) -> None:
        """One typed message from a worker (decoded and validated at the socket)."""
        w = self._worker(wid)
        now = time.monotonic()          # one clock read for the message and its tokens
        if w is not None:
            w.last_seen = now
        if isinstance(msg, m.Ready):
            self._on_ready(wid, msg.info)
        elif w is None:
            if not isinstance(msg, m.Bye):   # we restarted: it must say READY again
                log.info("message from unknown worker %s: ignored until its READY", wid)
        elif isinstance(msg, (m.Batch, m.Token, m.Done, m.Error, m.Parked, m.Logprobs, m.Invalid)):
            items = msg.items if isinstance(msg, m.Batch) else (msg,)
            tokens = 0
            for item in items:
                if type(item) is m.Token:
                    tokens += self._on_token(w, item, now)
                else:
                    self._on_item(w, item)
            if tokens:
                self.metrics.on_tokens(w.name, tokens, now)
            if not all(type(item) in _OUTPUT_ONLY for item in items):
                self.wake.set()     # a request ended or parked: its credit may dispatch
        elif isinstance(msg, m.Bye):
            self.worker_lost(wid, "worker left")
        elif isinstance(msg, m.Draining):
            log.info("worker %s is draining (its node stops or replaces it)", wid)
            self.drain_worker(wid, tell=False)

    def _on_ready(self, wid: str, info: m.ReadyInfo) -> None:
        sched = self.sched.get(info.served) if info.served else self.sched.default
        if sched is None:
            log.error("worker %s serves model %r, which this gateway does not know (a "
                      "[[models]] change needs a restart): ignored", wid, info.served)
            return
        old = self._of.get(wid)
        if old is not None and old is not sched:
            self.worker_lost(wid, "it restarted on another model", tell=False)
        self._of[wid] = sched
        requeued, failed = sched.add_worker(WorkerState(
            id=wid, slots=info.slots, name=info.name or wid, pid=info.pid, model=info.model,
            device=info.device, n_ctx=info.n_ctx, node=info.node, props=info.props,
            threads=msgspec.structs.asdict(info.threads) if info.threads else {}))
        self._fail_orphans(wid, "it restarted", requeued, failed)
        log.info("worker %s ready (model %s, node %s, pid %d, %d slot(s))", wid, sched.model,
                 info.node or "-", info.pid, info.slots)
        self.events.put_nowait(admin.WorkerReady(worker=wid, pid=info.pid, slots=info.slots))
        self.wake.set()

    def _on_item(self, w: WorkerState,
                 msg: m.Done | m.Error | m.Parked | m.Logprobs | m.Invalid) -> None:
        if isinstance(msg, m.Logprobs):
            s = w.inflight.get(msg.rid)
            if s is not None and not s.finished:
                self._emit(s, s.out.logprobs(s, msgspec.to_builtins(msg.content)))
        elif isinstance(msg, m.Invalid):
            self.counters.dropped_messages += 1
            log.error("worker %s sent a malformed %s for request %d: %s", w.id, msg.kind,
                      msg.rid, msg.why)
            if msg.kind in ("DONE", "ERROR"):        # it ended: end it here too
                self._on_end(w, m.Error(msg.rid, m.ErrorBody(
                    "internal", f"the worker's answer was malformed: {msg.why}")))
        elif isinstance(msg, m.Parked):
            s = self._of[w.id].park(w.id, msg.rid)
            if s is None:
                pass
            elif s.stalled_since is not None:     # its client takes nothing: it waits
                self.counters.parked += 1         # for the client (clock.py)
            else:                                 # it yielded (counted when asked), or
                self._of[w.id].want_resume(s)     # credit came meanwhile: it runs again
        else:
            self._on_end(w, msg)

    def _on_token(self, w: WorkerState, msg: m.Token, now: float) -> int:
        """A token to its client; 1 when it counts as a client's token (not a probe's)."""
        s = w.inflight.get(msg.rid)
        if s is None or s.finished:
            return 0
        if s.t_first is None:
            s.t_first = now
        elif not s.internal:
            self.metrics.itl.observe((now - s.t_last) * 1000, now)
        s.t_last = now
        s.pieces += 1
        if s.bill is not None:
            s.bill.fresh += 1
        if s.yield_at >= 0 and s.pieces > s.yield_at + YIELD_GRACE:
            s.park_sent, s.yield_at = False, -1    # the worker could not park it: unasked
        if s.pieces - s.granted >= self.window and s.stalled_since is None:
            s.stalled_since = now     # the worker may send no more: paused
        data = s.out.token(s, msg.text)
        s.owed += 1
        ch = s.channel
        if ch is not None and data:
            ch.write(data, tokens=True)
        elif s.owed >= self.grant_batch:   # held in memory by its front: taken at once
            self.grant(s)
        return 0 if s.internal else 1

    def _emit(self, s: Stream, data: bytes | None) -> None:
        """Bytes that are not a TOKEN (credit comes with the tokens they go with)."""
        if data and s.channel is not None:
            s.channel.write(data)

    def _on_end(self, w: WorkerState, msg: m.Done | m.Error) -> None:
        s = self._of[w.id].complete(w.id, msg.rid)
        if isinstance(msg, m.Done):
            st = msg.stats
            if st.prefix_hashes is not None:      # what the worker's prompt cache holds
                w.prefixes = set(st.prefix_hashes)
            if st.kv_store is not None:
                w.kv_store = msgspec.structs.asdict(st.kv_store)
            if st.slot_tokens is not None:
                w.slot_tokens = st.slot_tokens
            if st.threads is not None:
                w.threads = msgspec.structs.asdict(st.threads)
        if w.draining and not w.inflight and not w.parked:
            self.events.put_nowait(admin.WorkerDrained(worker=w.id))
        if s is None:
            return
        if isinstance(msg, m.Error):
            self._finish(s, err=from_code(msg.error.code, msg.error.message,
                                          msg.error.retry_after_ms))
            return
        st = msg.stats
        if not s.internal:
            self.counters.prompt_tokens += st.prompt_tokens
            self.counters.cache_hit_tokens += st.cached_tokens
            self.counters.drafted_tokens += st.drafted
            self.counters.accepted_tokens += st.accepted
        if s.finished and st.finish_reason == "cancelled" and st.phase in ("prefill", "decode"):
            if st.phase == "prefill":
                self.counters.cancelled_prefill += 1
            else:
                self.counters.cancelled_decode += 1
        self._finish(s, stats=st, worker=w.name)

    def worker_lost(self, wid: str, why: str, tell: bool = True) -> None:
        """A worker is gone or declared dead: re-queue what it had not started to answer,
        fail the rest; ``tell``: the supervisor learns it (kills it if it still runs)."""
        w = self._worker(wid)
        if w is not None:
            log.warning("worker %s (pid %d) lost: %s", wid, w.pid, why)
            if tell:
                self.events.put_nowait(admin.WorkerLost(worker=wid, pid=w.pid, why=why))
        sched = self._of.pop(wid, None)
        if sched is None:
            return
        requeued, failed = sched.remove_worker(wid)
        if requeued and not sched.ready:
            self._want(sched)
        self._fail_orphans(wid, why, requeued, failed)

    def _fail_orphans(self, wid: str, why: str, requeued: list[Stream],
                      failed: list[Stream]) -> None:
        requeued = [s for s in requeued if not s.internal]
        self.counters.requeued += len(requeued)
        self.counters.worker_failed += len(failed)
        if requeued or failed:
            log.warning("worker %s (%s): %d request(s) re-queued, %d failed",
                        wid, why, len(requeued), len(failed))
        for s in failed:
            if s.pieces:
                msg = f"worker {wid} failed ({why}) after output began"
            else:
                msg = (f"worker {wid} failed ({why}); {s.attempts} worker(s) died serving "
                       f"this request, it is not sent to another (at most {MAX_DISPATCHES})")
            self._finish(s, err=WorkerFailed(msg))
        self.wake.set()

    def drain_worker(self, wid: str, tell: bool = True) -> bool:
        """Give ``wid`` nothing new; a WorkerDrained event follows once it is idle.
        ``tell``: send it DRAIN (not when the worker said it drains)."""
        w = self._worker(wid)
        if w is None:
            return False
        w.draining = True
        if tell:
            self.send(wid, m.encode(m.Kind.DRAIN))
        if not w.inflight and not w.parked:
            self.events.put_nowait(admin.WorkerDrained(worker=wid))
        return True
