"""The gateway's core: every request's life, from ``open`` to its one ending.

The fronts (``tcp.py``, ``http/``) are adapters: they turn their wire format into a
``GenRequest``, ``open`` a ``Stream`` with an ``Output`` that renders the events back in
their dialect, and ``close`` it when their client cancels or goes away.  Everything
between lives here and in ``streams.py``, once for every dialect: admission (tenants,
``tenants.py``) and routing (``scheduler.py``, in ``fairness.py``'s order, running
requests yielding their slots), token credit and the windows, parking and slow clients
and deadlines (``clock.py``), failover, counters and metrics.  The worker link
(``link.py``) hands in each typed message a worker sent (``on_worker``,
``worker_events.py``), calls ``flush`` after each round of them and ``clock.tick`` a few
times a second, and sends what the core queued (``outgoing``); the supervisor link
(``supervisor_link.py``) forwards the supervisor's commands and takes the core's events.

Each accepted request ends in exactly one DONE or ERROR (``_finish``), whatever happens
to its client or its worker: finished streams ignore everything that comes later.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import Any

import msgspec

from llmctl.common import admin, messages as m
from llmctl.common.config import Config, GenerationConfig, SchedulingConfig, TenantEntry
from llmctl.common.errors import LlmctlError, ModelNotFound
from llmctl.common.request import GenRequest
from llmctl.dataplane.fairness import Fairness
from llmctl.dataplane.metrics import Counters, GatewayMetrics
from llmctl.dataplane.scheduler import Scheduler, Schedulers
from llmctl.dataplane.streams import Channel, Output, Stream
from llmctl.dataplane.tenants import DEFAULT, Tenancy
from llmctl.dataplane.worker_events import WorkerEvents

log = logging.getLogger(__name__)

WANT_EVERY_S = 0.5       # a model that is not loaded is asked for at most this often


class Gateway(WorkerEvents):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # One Scheduler per served model: its own queue bound, credits and prefix routing.
        self.tenancy = Tenancy(cfg, time.monotonic())
        self.fairness = Fairness(cfg.scheduling, self.tenancy.norm_usage)
        self.sched = Schedulers([(e.name, e.load == "on_demand") for e in cfg.served],
                                cfg.gateway.max_queue, self.fairness)
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
        ``lenient`` (the OpenAI front of a config with one ``[model]`` and no
        ``[[models]]``): any name is the one model."""
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
             tag: int = 0, sched: Scheduler | None = None, tenant: str = DEFAULT) -> Stream:
        """Admit a request of ``tenant`` to its model or raise ModelNotFound / NotReady /
        RateLimited / Overloaded / ShuttingDown (counted).  ``out`` renders its events, on
        ``channel`` when it has one (else the front collects them).  A request for an
        on-demand model that is not loaded waits in that model's queue (its deadline
        counts) and the supervisor is asked to load it."""
        s = Stream(request=request, out=out, tag=tag, tenant=tenant)
        bill = None
        try:
            sched = sched or self.route(request.model)
            t = self.tenancy.get(tenant)
            queued = self.waiting()[t.name] if t.entry.max_queued else 0
            bill = self.tenancy.admit(tenant, s.t_admit, queued)
            sched.admit(s)
        except LlmctlError as err:
            if bill is not None:
                self.tenancy.release(bill)
            self.note_error(err)
            raise
        s.bill = bill
        if channel is not None:
            channel.attach(s)
        self.counters.admitted += 1
        if not sched.ready:
            self._want(sched)
        self.wake.set()
        return s

    def waiting(self) -> Counter[str]:
        """Requests waiting for a slot, by tenant: queued, or parked to yield theirs."""
        return Counter(s.tenant for sched in self.sched for s in sched.waiting())

    def reconfigure(self, generation: GenerationConfig, scheduling: SchedulingConfig,
                    tenants: tuple[TenantEntry, ...]) -> None:
        """A reload: new defaults, policy and tenants for what is admitted from now on;
        what runs goes on (a tenant's counts and usage are kept)."""
        self.cfg = msgspec.structs.replace(self.cfg, generation=generation,
                                           scheduling=scheduling, tenants=tenants)
        self.generation = generation
        self.tenancy.configure(self.cfg, time.monotonic())
        self.fairness = Fairness(scheduling, self.tenancy.norm_usage)
        for sched in self.sched:
            sched.fairness = self.fairness

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
        now = time.monotonic()
        for sched in self.sched:
            for w, s in sched.preempt(now):     # running requests that yield their slot
                self.counters.yielded += 1
                out.append((w.id, m.encode(m.Kind.PARK, s.rid, m.YIELD)))
        while self._outbox:
            out.append(self._outbox.popleft())
        if self._credit:
            credit, self._credit = self._credit, {}
            out += [(wid, m.encode_credit(grants)) for wid, grants in credit.items()
                    if wid in self._of]
        for sched in self.sched:
            for w, s, resumed in sched.dispatch(now):
                if resumed:
                    self.counters.resumed += 1
                    out.append((w.id, m.encode(m.Kind.RESUME, s.rid)))
                    continue
                self.metrics.queue_wait.observe((now - s.t_admit) * 1000)
                self.counters.dispatched += 1
                out.append((w.id, m.generate(s.rid, msgspec.structs.replace(
                    s.request, window=self.window))))
        return out

    def send(self, wid: str, frames: list[bytes]) -> None:
        self._outbox.append((wid, frames))
        self.wake.set()

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
        if s.bill is not None:
            self.tenancy.release(s.bill)
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
                pieces=stats.pieces, slot=stats.slot, stop_word=stats.stop_word,
                drafted=stats.drafted or None,
                accepted=stats.accepted if stats.drafted else None,
                worker=worker or s.worker or "",
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
