"""The gateway's core: every request's life, from ``submit`` to its one ending.

State and decisions, no I/O: the fronts (``tcp.py``, ``http.py``) call ``submit``,
``cancel`` and ``grant``; the worker link (``link.py``) hands in each typed message a
worker sent (``on_worker``), calls ``tick`` a few times a second and sends what the core
queued (``outgoing``); the supervisor link (``admin.py``) forwards the supervisor's
commands and takes the core's events (a worker became ready, was lost, drained).

Each accepted request ends in exactly one DONE or ERROR (``_finish``), whatever happens
to its client or its worker: finished requests ignore everything that comes later.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import msgspec

from llmctl.common import admin, messages as m
from llmctl.common.config import Config
from llmctl.common.errors import (DeadlineExceeded, LlmctlError, ModelNotFound, SlowClient,
                                  WorkerFailed, from_code)
from llmctl.common.protocol import Defaults, GenerateRequest
from llmctl.dataplane.metrics import Counters, GatewayMetrics
from llmctl.dataplane.scheduler import (MAX_DISPATCHES, Request, Scheduler, Schedulers, Sink,
                                        WorkerState)

log = logging.getLogger(__name__)

WANT_EVERY_S = 0.5       # a model that is not loaded is asked for at most this often
PARKED_PER_SLOT = 8      # a worker keeps at most slots x this many parked requests
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
        g = cfg.generation
        self.defaults = Defaults(g.max_tokens, g.temperature, g.top_p, g.top_k, g.deadline_ms,
                                 g.max_deadline_ms)
        self.model_name = cfg.default_model.name     # the default model
        self.window = cfg.gateway.token_window
        self.interval = cfg.workers.heartbeat_interval_s
        self._probe_params = GenerateRequest(
            prompt="Hello", messages=None, max_tokens=1, temperature=0.0, top_p=1.0, top_k=0,
            seed=None, stop=(), deadline_ms=int(cfg.workers.probe_timeout_s * 1000))
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
        self.dirty: list[Any] = []            # sinks holding output to write (``flush``)

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

    def submit(self, params: GenerateRequest, sink: Sink, stream: int = 0,
               sched: Scheduler | None = None) -> Request:
        """Admit a request to its model or raise ModelNotFound / NotReady / Overloaded /
        ShuttingDown.  A request for an on-demand model that is not loaded waits in that
        model's queue (its deadline counts) and the supervisor is asked to load it."""
        req = Request(params=params, sink=sink, stream=stream)
        try:
            sched = sched or self.route(params.model)
            sched.admit(req)
        except LlmctlError as err:
            self.note_error(err)
            raise
        self.counters.admitted += 1
        if not sched.ready:
            self._want(sched)
        self.wake.set()
        return req

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
        for req in failed:
            self._finish(req, err=err)
        if failed:
            log.warning("model %s cannot be loaded (%s): %d queued request(s) answered %s",
                        model, err.message, len(failed), err.code.value)
        return len(failed)

    def models(self) -> dict[str, dict[str, Any]]:
        """Per model: what the supervisor's eviction and ``llmctl models`` need."""
        now = time.monotonic()
        return {s.model: {"queue": len(s.queue), "inflight": s.inflight_count(),
                          "parked": s.parked_count(), "open": s.open_count(),
                          "workers_ready": sum(1 for w in s.workers.values() if not w.draining),
                          "idle_s": round(now - s.last_used, 3) if s.last_used else None,
                          "served": sum(w.served for w in s.workers.values())}
                for s in self.sched}

    def note_error(self, err: LlmctlError) -> None:
        """Count an error answered to a client (by code), whichever front sent it."""
        self.counters.errors[err.code.value] += 1

    def cancel(self, req: Request) -> None:
        """The client cancelled, or went away: DONE(cancelled), free the work."""
        if req.finished:
            return
        self.counters.cancelled += 1
        if not self._stop_work(req):
            self.counters.cancelled_queued += 1
        self._finish(req, stats={"finish_reason": "cancelled", "prompt_tokens": 0,
                                 "completion_tokens": req.pieces})

    def grant(self, req: Request, n: int) -> None:
        """The client's connection took ``n`` of this stream's tokens: more may come."""
        if n > 0 and req.worker is not None and not req.finished:
            owed = self._credit.setdefault(req.worker, {})
            unsent = owed[req.rid] = owed.get(req.rid, 0) + n
            req.granted += n
            req.stalled_since = None
            req.park_sent = False
            if req.parked and req.worker in self._of:
                self._of[req.worker].want_resume(req)
                self.wake.set()
            elif req.pieces - (req.granted - unsent) >= self._refill_at:
                # Half the worker's window is used: refill it. Below that the credit
                # waits for the next message to the workers (every stream's owed goes
                # in one CREDIT then), so streams share sends instead of each round
                # sending one: fewer messages for both processes, and the worker
                # still never runs dry while its client keeps up.
                self.wake.set()

    def drain(self) -> None:
        """A stop: admit nothing new; what runs finishes."""
        self.sched.draining = True
        log.info("draining: new requests are refused")

    # ---- the worker link's interface --------------------------------------------------
    def flush(self) -> None:
        """The end of a round of worker messages: every sink that queued output
        writes it now, once (tcp.Connection.flush)."""
        dirty = self.dirty
        if dirty:
            self.dirty = []
            for sink in dirty:
                sink.flush()

    def outgoing(self) -> list[tuple[str, list[bytes]]]:
        """Everything to send to workers now, in order: resumes, control messages, the
        token credit owed (one CREDIT per worker), then new work for free credits."""
        out = []
        for sched in self.sched:
            for w, req in sched.take_resumes():
                self.counters.resumed += 1
                out.append((w.id, m.encode(m.Kind.RESUME, req.rid)))
        while self._outbox:
            out.append(self._outbox.popleft())
        if self._credit:
            credit, self._credit = self._credit, {}
            out += [(wid, m.encode_credit(grants)) for wid, grants in credit.items()
                    if wid in self._of]
        for sched in self.sched:
            for w, req in sched.take():
                self.metrics.queue_wait.observe((time.monotonic() - req.t_admit) * 1000)
                self.counters.dispatched += 1
                out.append((w.id, m.generate(req.rid, req.params.work(self.window))))
        return out

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
            req = w.inflight.get(msg.rid)
            if req is not None and not req.finished:
                req.sink.on_logprobs(req, msgspec.to_builtins(msg.content))
        elif isinstance(msg, m.Invalid):
            self.counters.dropped_messages += 1
            log.error("worker %s sent a malformed %s for request %d: %s", w.id, msg.kind,
                      msg.rid, msg.why)
            if msg.kind in ("DONE", "ERROR"):        # it ended: end it here too
                self._on_end(w, m.Error(msg.rid, m.ErrorBody(
                    "internal", f"the worker's answer was malformed: {msg.why}")))
        elif isinstance(msg, m.Parked):
            req = self._of[w.id].park(w.id, msg.rid)
            if req is not None:
                self.counters.parked += 1
                if req.stalled_since is None:   # credit came meanwhile: run it again
                    self._of[w.id].want_resume(req)
        else:
            self._on_end(w, msg)

    def _on_token(self, w: WorkerState, msg: m.Token, now: float) -> int:
        """A token to its client; 1 when it counts as a client's token (not a probe's)."""
        req = w.inflight.get(msg.rid)
        if req is None or req.finished:
            return 0
        if req.t_first is None:
            req.t_first = now
        elif not req.internal:
            self.metrics.itl.observe((now - req.t_last) * 1000, now)
        req.t_last = now
        req.pieces += 1
        if req.pieces - req.granted >= self.window and req.stalled_since is None:
            req.stalled_since = now     # the worker may send no more: paused
        req.sink.on_token(req, msg.text)
        return 0 if req.internal else 1

    def _on_end(self, w: WorkerState, msg: m.Done | m.Error) -> None:
        req = self._of[w.id].complete(w.id, msg.rid)
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
        if req is None:
            return
        if isinstance(msg, m.Error):
            self._finish(req, err=from_code(msg.error.code, msg.error.message,
                                            msg.error.retry_after_ms))
            return
        st = msg.stats
        if not req.internal:
            self.counters.prompt_tokens += st.prompt_tokens
            self.counters.cache_hit_tokens += st.cached_tokens
        if req.finished and st.finish_reason == "cancelled" and st.phase in ("prefill", "decode"):
            if st.phase == "prefill":
                self.counters.cancelled_prefill += 1
            else:
                self.counters.cancelled_decode += 1
        stats = msgspec.structs.asdict(st)
        del stats["prefix_hashes"], stats["kv_store"], stats["threads"]
        if stats.get("embeddings") is None:
            stats.pop("embeddings", None)
        stats["worker"] = w.name
        self._finish(req, stats=stats)

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

    def _fail_orphans(self, wid: str, why: str, requeued: list[Request],
                      failed: list[Request]) -> None:
        requeued = [r for r in requeued if not r.internal]
        self.counters.requeued += len(requeued)
        self.counters.worker_failed += len(failed)
        if requeued or failed:
            log.warning("worker %s (%s): %d request(s) re-queued, %d failed",
                        wid, why, len(requeued), len(failed))
        for req in failed:
            if req.pieces:
                msg = f"worker {wid} failed ({why}) after output began"
            else:
                msg = (f"worker {wid} failed ({why}); {req.attempts} worker(s) died serving "
                       f"this request, it is not sent to another (at most {MAX_DISPATCHES})")
            self._finish(req, err=WorkerFailed(msg))
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

    # ---- time -----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Deadlines, stalled streams, liveness of workers, deep probes."""
        for sched in self.sched:
            for req in sched.expire_queued(now):
                self.counters.expired_queued += 1
                self._finish(req, err=DeadlineExceeded(
                    "deadline passed while queued" if sched.ready else
                    f"deadline passed while queued: model {sched.model!r} was not loaded in time"))
            for req in sched.expired_running(now):
                if not req.internal:
                    self.counters.expired_running += 1
                self._stop_work(req)
                self._finish(req, err=DeadlineExceeded("deadline passed while running"))
        self._check_stalled(now)
        liveness = self.interval * self.cfg.workers.liveness
        probe_every = self.cfg.workers.probe_interval_s
        for w in list(self.sched.workers.values()):
            if w.id not in self._of:
                continue                        # lost meanwhile
            if now - w.last_seen > liveness:
                self.worker_lost(w.id, f"silent for {now - w.last_seen:.1f}s")
            elif probe_every and not w.inflight and not w.draining \
                    and now - w.last_busy >= probe_every:
                self._probe(w)

    def _check_stalled(self, now: float) -> None:
        """Streams whose client takes no output: park them after ``park_after_s`` (their
        slot serves others meanwhile), end them with slow_client after
        ``slow_client_timeout_s``."""
        g = self.cfg.gateway
        for w in self.sched.workers.values():
            for req in [*w.inflight.values(), *w.parked.values()]:
                since = req.stalled_since
                if since is None or req.finished:
                    continue
                if now - since >= g.slow_client_timeout_s:
                    self.counters.slow_clients += 1
                    log.info("stream %d took no output for %.1fs: cancelled (slow_client)",
                             req.stream, now - since)
                    self._stop_work(req)
                    self._finish(req, err=SlowClient(
                        f"the client took no output for {g.slow_client_timeout_s:g}s; "
                        "the request was cancelled and its slot freed"))
                elif g.park_after_s and not req.parked and not req.park_sent \
                        and now - since >= g.park_after_s \
                        and len(w.parked) < w.slots * PARKED_PER_SLOT:
                    req.park_sent = True
                    self.send(w.id, m.encode(m.Kind.PARK, req.rid))

    def _probe(self, w: WorkerState) -> None:
        """Deep probe of an idle worker: a real 1-token generation with a deadline."""
        req = Request(params=self._probe_params, sink=_ProbeSink(self, w.id), internal=True)
        self._of[w.id].assign(w, req)
        self.counters.probes += 1
        self.send(w.id, m.generate(req.rid, req.params.work()))

    # ---- endings ----------------------------------------------------------------------
    def _stop_work(self, req: Request) -> bool:
        """Take the request back from the queue or its worker; True if a worker had it."""
        sched = self.sched.get(req.model)
        if sched is not None and sched.dequeue(req):
            return False
        if req.worker is not None:
            self.send(req.worker, m.encode(m.Kind.CANCEL, req.rid))
            return True
        return False

    def _finish(self, req: Request, stats: dict[str, Any] | None = None,
                err: LlmctlError | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        if req.internal:
            if err is not None:
                req.sink.on_error(req, err)
            return
        if err is not None:
            self.note_error(err)
            req.sink.on_error(req, err)
            return
        now = time.monotonic()
        assert stats is not None
        out = dict(stats)
        out["ttft_ms"] = round(((req.t_first or now) - req.t_admit) * 1000, 3)
        out["total_ms"] = round((now - req.t_admit) * 1000, 3)
        out["worker"] = stats.get("worker") or req.worker or ""
        self.counters.done += 1
        self.metrics.on_done(str(out["worker"]), out, now)
        req.sink.on_done(req, out)


class _ProbeSink:
    """Receives a deep probe's outcome: any error means the worker cannot serve."""

    def __init__(self, gw: Gateway, wid: str) -> None:
        self.gw = gw
        self.wid = wid

    def on_token(self, req: Request, text: str) -> None:
        pass

    def on_done(self, req: Request, stats: dict[str, Any]) -> None:
        pass

    def on_logprobs(self, req: Request, content: list[dict[str, Any]]) -> None:
        pass

    def on_error(self, req: Request, err: LlmctlError) -> None:
        self.gw.counters.probes_failed += 1
        self.gw.worker_lost(self.wid, f"deep probe failed: {err.code.value}: {err.message}")
