"""The gateway's core: every request's life, from ``open`` to its one ending.

The fronts (``tcp.py``, ``http/``) are adapters: they turn their wire format into a
``GenRequest``, ``open`` a ``Stream`` with an ``Output`` that renders the events back in
their dialect, and ``close`` it when their client cancels or goes away.  Everything
between lives here and in ``streams.py``, once for every dialect: admission and routing
(``scheduler.py``), token credit and the windows, parking and slow clients, deadlines,
failover, counters and metrics.  The worker link (``link.py``) hands in each typed message
a worker sent (``on_worker``), calls ``flush`` after each round of them and ``tick`` a few
times a second, and sends what the core queued (``outgoing``); the supervisor link
(``supervisor_link.py``) forwards the supervisor's commands and takes the core's events.

Each accepted request ends in exactly one DONE or ERROR (``_finish``), whatever happens
to its client or its worker: finished streams ignore everything that comes later.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import msgspec

from llmctl.common import admin, messages as m
from llmctl.common.config import Config, GenerationConfig
from llmctl.common.errors import LlmctlError, ModelNotFound, WorkerFailed, from_code
from llmctl.common.request import GenRequest
from llmctl.dataplane.metrics import Counters, GatewayMetrics
from llmctl.dataplane.scheduler import MAX_DISPATCHES, Scheduler, Schedulers, WorkerState
from llmctl.dataplane.streams import Channel, Output, Stream

log = logging.getLogger(__name__)

WANT_EVERY_S = 0.5       # a model that is not loaded is asked for at most this often
# Worker messages that only carry output: nothing for the worker link to send follows from
# them (the credit they earn is sent when the client takes them), so they do not wake it.
_OUTPUT_ONLY = (m.Token, m.Logprobs)


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # One Scheduler per served model: its own queue bound, credits and prefix routing.
        self.sched = Schedulers([(e.name, e.load == "on_demand") for e in cfg.served],
                                cfg.gateway.max_queue)
        self.strict_models = bool(cfg.models)   # [[models]]: an unknown name is an error
        self._of: dict[str, Scheduler] = {}      # worker routing id -> its model's Scheduler
        self.generation: GenerationConfig = cfg.generation    # what a request leaves out
        self.model_name = cfg.default_model.name     # the default model
        self.window = cfg.gateway.token_window
        self.grant_batch = max(1, self.window // 4)  # credit goes back this much at a time
        self.interval = cfg.workers.heartbeat_interval_s
        self.probe_request = GenRequest(prompt="Hello", max_tokens=1, temperature=0.0,
                                         deadline_ms=int(cfg.workers.probe_timeout_s * 1000))
        self.started = time.time()
        self.counters = Counters()
        self.metrics = GatewayMetrics()
        self.procs: dict[str, Any] = {}       # process figures pushed by the supervisor
        self.listening: list[str] = []        # set by main once the fronts listen
        self.http_listening: list[str] = []
        self.metrics_url = ""
        self.wake = asyncio.Event()           # the worker link has something to send
        self.events: asyncio.Queue[admin.FromGateway] = asyncio.Queue()   # for the supervisor
        self._outbox: deque[tuple[str, list[bytes]]] = deque()
        self._credit: dict[str, dict[int, int]] = {}   # token credit owed, by worker and rid
        self._refill_at = max(1, cfg.gateway.token_window // 2)    # see ``grant``
        self.dirty: list[Channel] = []        # channels holding output to write (``flush``)

    # ---- the fronts' interface ------------------------------------------------------
    def route(self, model: str | None, lenient: bool = False) -> Scheduler:
        """The Scheduler of ``model`` (None/"" = the default model), or ModelNotFound.
        ``lenient`` (the OpenAI front of a one-[model] config, as before [[models]]):
        any name is the one model."""
        if not model:
            return self.sched.default
        sched = self.sched.get(model)
        if sched is None:
            if lenient and not self.strict_models:
                return self.sched.default
            known = ", ".join(s.model for s in self.sched)
            raise ModelNotFound(f"the model {model!r} does not exist (served: {known})")
        return sched

    def open(self, request: GenRequest, out: Output, channel: Channel | None = None,
             tag: int = 0, sched: Scheduler | None = None) -> Stream:
        """Admit a request to its model or raise ModelNotFound / NotReady / Overloaded /
        ShuttingDown (counted).  ``out`` renders its events, on ``channel`` when it has
        one (else the front collects them).  A request for an on-demand model that is not
        loaded waits in that model's queue (its deadline counts) and the supervisor is
        asked to load it."""
        s = Stream(request=request, out=out, tag=tag)
        try:
            sched = sched or self.route(request.model)
            sched.admit(s)
        except LlmctlError as err:
            self.note_error(err)
            raise
        if channel is not None:
            channel.attach(s)
        self.counters.admitted += 1
        if not sched.ready:
            self._want(sched)
        self.wake.set()
        return s

    def _want(self, sched: Scheduler) -> None:
        """Ask the supervisor to load ``sched``'s model (at most every WANT_EVERY_S)."""
        now = time.monotonic()
        if now - sched.wanted_at >= WANT_EVERY_S:
            sched.wanted_at = now
            self.events.put_nowait(admin.ModelWanted(model=sched.model))

    def model_unavailable(self, model: str, err: LlmctlError) -> int:
        """The supervisor cannot load ``model`` now: its queued requests get ``err``."""
        sched = self.sched.get(model)
        if sched is None or sched.ready:
            return 0
        failed = list(sched.queue)
        sched.queue.clear()
        for st in failed:
            self._finish(st, err=err)
        if failed:
            log.warning("model %s cannot be loaded (%s): %d queued request(s) answered %s",
                        model, err.message, len(failed), err.code.value)
        return len(failed)

    def note_error(self, err: LlmctlError) -> None:
        """Count an error answered to a client (by code), whichever front sent it."""
        self.counters.errors[err.code.value] += 1

    def close(self, s: Stream) -> None:
        """The client cancelled, or went away: DONE(cancelled), free the work."""
        if s.channel is not None:
            s.channel.detach(s)
        if s.finished:
            return
        self.counters.cancelled += 1
        if not self._stop_work(s):
            self.counters.cancelled_queued += 1
        self._finish(s, stats=m.DoneStats(finish_reason="cancelled", completion_tokens=s.pieces,
                                          phase=""))

    def grant(self, s: Stream) -> None:
        """The client took ``s.owed`` more tokens: the worker may send as many more."""
        n, s.owed = s.owed, 0
        if n <= 0 or s.worker is None or s.finished:
            return
        owed = self._credit.setdefault(s.worker, {})
        unsent = owed[s.rid] = owed.get(s.rid, 0) + n
        s.granted += n
        s.stalled_since = None
        s.park_sent = False
        if s.parked and s.worker in self._of:
            self._of[s.worker].want_resume(s)
            self.wake.set()
        elif s.pieces - (s.granted - unsent) >= self._refill_at:
            # Half the worker's window is used: refill it. Below that the credit
            # waits for the next message to the workers (every stream's owed goes
            # in one CREDIT then), so streams share sends instead of each round
            # sending one: fewer messages for both processes, and the worker
            # still never runs dry while its client keeps up.
            self.wake.set()

    def drop_channel(self, ch: Channel) -> None:
        """A client that does not read: its streams end, its connection is closed."""
        self.counters.slow_clients += 1
        for s in list(ch.streams.values()):
            self.close(s)
        ch.abort()

    def end(self, s: Stream, err: LlmctlError) -> None:
        """End ``s`` with ``err`` now, wherever it is (queued, at a worker, parked)."""
        self._stop_work(s)
        self._finish(s, err=err)

    def drain(self) -> None:
        """A stop: admit nothing new; what runs finishes."""
        self.sched.draining = True
        log.info("draining: new requests are refused")

    # ---- the worker link's interface --------------------------------------------------
    def flush(self) -> None:
        """The end of a round of worker messages: every channel that queued output
        writes it now, once (``streams.Channel.flush``)."""
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for ch in dirty:
                ch.flush()

    def outgoing(self) -> list[tuple[str, list[bytes]]]:
        """Everything to send to workers now, in order: resumes, control messages, the
        token credit owed (one CREDIT per worker), then new work for free credits."""
        out = []
        for sched in self.sched:
            for w, s in sched.take_resumes():
                self.counters.resumed += 1
                out.append((w.id, m.encode(m.Kind.RESUME, s.rid)))
        while self._outbox:
            out.append(self._outbox.popleft())
        if self._credit:
            credit, self._credit = self._credit, {}
            out += [(wid, m.encode_credit(grants)) for wid, grants in credit.items()
                    if wid in self._of]
        for sched in self.sched:
            for w, s in sched.take():
                self.metrics.queue_wait.observe((time.monotonic() - s.t_admit) * 1000)
                self.counters.dispatched += 1
                out.append((w.id, m.generate(s.rid, msgspec.structs.replace(
                    s.request, window=self.window))))
        return out

    def knows(self, wid: str) -> bool:
        return wid in self._of

    def assign(self, w: WorkerState, s: Stream) -> None:
        """Give ``s`` to ``w`` outside the queue (a deep probe)."""
        self._of[w.id].assign(w, s)

    def _worker(self, wid: str) -> WorkerState | None:
        sched = self._of.get(wid)
        return sched.workers.get(wid) if sched is not None else None

    def send(self, wid: str, frames: list[bytes]) -> None:
        self._outbox.append((wid, frames))
        self.wake.set()

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
            device=info.device, n_ctx=info.n_ctx, node=info.node,
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
            if s is not None:
                self.counters.parked += 1
                if s.stalled_since is None:   # credit came meanwhile: run it again
                    self._of[w.id].want_resume(s)
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

    # ---- endings ----------------------------------------------------------------------
    def _stop_work(self, s: Stream) -> bool:
        """Take the request back from the queue or its worker; True if a worker had it."""
        sched = self.sched.get(s.model)
        if sched is not None and sched.dequeue(s):
            return False
        if s.worker is not None:
            self.send(s.worker, m.encode(m.Kind.CANCEL, s.rid))
            return True
        return False

    def _finish(self, s: Stream, stats: m.DoneStats | None = None,
                err: LlmctlError | None = None, worker: str = "") -> None:
        """The one ending of a stream: its DONE (``stats``) or its ERROR (``err``),
        rendered by its front and written at once."""
        if s.finished:
            return
        s.finished = True
        if err is not None:
            if not s.internal:
                self.note_error(err)
            data = s.out.error(s, err)
        else:
            assert stats is not None
            now = time.monotonic()
            fin = m.Finished(
                finish_reason=stats.finish_reason, prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                cached_tokens=stats.cached_tokens if stats.phase else None,
                phase=stats.phase or None, prefill_ms=stats.prefill_ms if stats.phase else None,
                decode_ms=stats.decode_ms if stats.phase else None,
                embeddings=stats.embeddings, tokens=stats.tokens, text=stats.text,
                pieces=stats.pieces, worker=worker or s.worker or "",
                ttft_ms=round(((s.t_first or now) - s.t_admit) * 1000, 3),
                total_ms=round((now - s.t_admit) * 1000, 3))
            if s.internal:
                return
            self.counters.done += 1
            self.metrics.on_done(fin, now)
            data = s.out.done(s, fin)
        ch = s.channel
        if ch is not None:
            ch.detach(s)
            if data:
                ch.write(data)
                ch.flush()
