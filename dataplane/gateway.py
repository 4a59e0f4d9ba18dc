"""The gateway: one asyncio loop, a ZeroMQ ROUTER to the workers, the client fronts.

It owns the scheduler (admission queue + credits) and every request's life: each
accepted request ends in exactly one DONE or ERROR (``_finish``), whatever happens
to its client or its worker.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any

import zmq
import zmq.asyncio

from llmctl.common.config import Config
from llmctl.common.procs import bind_private
from llmctl.common import messages as m
from llmctl.common.errors import (DeadlineExceeded, LlmctlError, SlowClient, WorkerFailed,
                              from_code)
from llmctl.common.protocol import Defaults, GenerateRequest
from llmctl.dataplane.metrics import GatewayMetrics
from llmctl.dataplane.scheduler import MAX_DISPATCHES, Request, Scheduler, Sink, WorkerState

log = logging.getLogger(__name__)

PARKED_PER_SLOT = 8      # a worker keeps at most slots x this many parked requests


class Gateway:
    def __init__(self, cfg: Config, ctx: zmq.asyncio.Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.sched = Scheduler(cfg.gateway.max_queue)
        g = cfg.generation
        self.defaults = Defaults(g.max_tokens, g.temperature, g.top_p, g.top_k, g.deadline_ms,
                                 g.max_deadline_ms)
        self.model_name = os.path.basename(cfg.model.path).removesuffix(".gguf")
        self.window = cfg.gateway.token_window
        self.interval = cfg.workers.heartbeat_interval_s
        self.probe_interval = cfg.workers.probe_interval_s
        self._probe_params = GenerateRequest(
            prompt="Hello", messages=None, max_tokens=1, temperature=0.0, top_p=1.0, top_k=0,
            seed=None, stop=(), deadline_ms=int(cfg.workers.probe_timeout_s * 1000))
        self.started = time.time()
        self.listening: list[str] = []        # the TCP front
        self.http_listening: list[str] = []   # the HTTP front, when [http] enabled
        self.metrics_url = ""
        self.connections = 0
        self._outbox: deque[tuple[str, list[bytes]]] = deque()
        self._credit: dict[str, dict[int, int]] = {}   # token credit owed, by worker and rid
        self._wake = asyncio.Event()
        self.router: zmq.asyncio.Socket | None = None
        self.counters: dict[str, int] = dict.fromkeys((
            "admitted", "dispatched", "done", "cancelled", "cancelled_queued",
            "cancelled_prefill", "cancelled_decode", "expired_queued", "expired_running",
            "requeued", "worker_failed", "slow_clients", "parked", "resumed", "probes",
            "probes_failed",
            "prompt_tokens", "cache_hit_tokens"), 0)
        # Workers declared dead here, by routing id: the supervisor kills the process
        # if it still runs (hung), then restarts it.
        self.lost: dict[str, dict[str, Any]] = {}
        self.metrics = GatewayMetrics()
        self.procs: dict[str, Any] = {}     # process figures pushed by the supervisor
        self.errors: dict[str, int] = {}

    # ---- the fronts' interface ------------------------------------------------------
    def submit(self, params: GenerateRequest, sink: Sink, stream: int = 0) -> Request:
        """Admit a request or raise NotReady / Overloaded / ShuttingDown."""
        req = Request(params=params, sink=sink, stream=stream)
        try:
            self.sched.admit(req)
        except LlmctlError as err:
            self.note_error(err)
            raise
        self.counters["admitted"] += 1
        self._wake.set()
        return req

    def note_error(self, err: LlmctlError) -> None:
        """Count an error answered to a client (by code), whichever front sent it."""
        self.errors[err.code.value] = self.errors.get(err.code.value, 0) + 1

    def cancel(self, req: Request) -> None:
        """The client cancelled, or went away: DONE(cancelled), free the work."""
        if req.finished:
            return
        self.counters["cancelled"] += 1
        if not self._stop_work(req):
            self.counters["cancelled_queued"] += 1
        self._finish(req, stats={"finish_reason": "cancelled", "prompt_tokens": 0,
                                 "completion_tokens": req.pieces})

    def grant(self, req: Request, n: int) -> None:
        """The client's connection took ``n`` of this stream's tokens: more may come."""
        if n > 0 and req.worker is not None and not req.finished:
            owed = self._credit.setdefault(req.worker, {})
            owed[req.rid] = owed.get(req.rid, 0) + n
            req.granted += n
            req.stalled_since = None
            req.park_sent = False
            if req.parked:
                self.sched.want_resume(req)
            self._wake.set()

    def _stop_work(self, req: Request) -> bool:
        """Take the request back from the queue or its worker; True if a worker had it."""
        if self.sched.dequeue(req):
            return False
        if req.worker is not None:
            self._send(req.worker, m.encode(m.Kind.CANCEL, req.rid))
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
        out["worker"] = req.worker or stats.get("worker", "")
        self.counters["done"] += 1
        self.metrics.on_done(str(out["worker"]), out, now)
        req.sink.on_done(req, out)

    # ---- worker side ----------------------------------------------------------------
    def _send(self, wid: str, frames: list[bytes]) -> None:
        self._outbox.append((wid, frames))
        self._wake.set()

    async def _sender(self) -> None:
        assert self.router is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            for w, req in self.sched.take_resumes():
                self.counters["resumed"] += 1
                await self._route(w.id, m.encode(m.Kind.RESUME, req.rid))
            while self._outbox:
                wid, frames = self._outbox.popleft()
                await self._route(wid, frames)
            if self._credit:      # all the credit a worker is owed, in one message
                credit, self._credit = self._credit, {}
                for wid, grants in credit.items():
                    if wid in self.sched.workers:
                        await self._route(wid, m.encode_credit(grants))
            for w, req in self.sched.take():
                self.metrics.queue_wait.observe((time.monotonic() - req.t_admit) * 1000)
                body = req.params.worker_fields()
                body["window"] = self.cfg.gateway.token_window
                self.counters["dispatched"] += 1
                await self._route(w.id, m.encode(m.Kind.GENERATE, req.rid, body))

    async def _route(self, wid: str, frames: list[bytes]) -> None:
        assert self.router is not None
        try:
            await self.router.send_multipart([wid.encode(), *frames])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.warning("worker %s is unreachable: dropping it", wid)
            self.worker_lost(wid, "unreachable")

    def worker_lost(self, wid: str, why: str) -> None:
        w = self.sched.workers.get(wid)
        if w is not None:
            self.lost[wid] = {"pid": w.pid, "why": why}
            log.warning("worker %s (pid %d) declared dead: %s", wid, w.pid, why)
        requeued, failed = self.sched.remove_worker(wid)
        self._fail_orphans(wid, why, requeued, failed)

    def _fail_orphans(self, wid: str, why: str, requeued: list[Request],
                      failed: list[Request]) -> None:
        requeued = [r for r in requeued if not r.internal]
        self.counters["requeued"] += len(requeued)
        self.counters["worker_failed"] += len(failed)
        if requeued or failed:
            log.warning("worker %s lost (%s): %d request(s) re-queued, %d failed",
                        wid, why, len(requeued), len(failed))
        for req in failed:
            if req.pieces:
                msg = f"worker {wid} failed ({why}) after output began"
            else:
                msg = (f"worker {wid} failed ({why}); {req.attempts} worker(s) died serving "
                       f"this request, it is not sent to another (at most {MAX_DISPATCHES})")
            self._finish(req, err=WorkerFailed(msg))
        self._wake.set()

    async def _receiver(self) -> None:
        assert self.router is not None
        while True:
            frames = await self.router.recv_multipart()
            wid = frames[0].decode(errors="replace")
            try:
                msg = m.decode(frames[1:])
                if msg.kind is m.Kind.BATCH:
                    for sub in m.decode_batch(msg.body):
                        self._on_worker(wid, sub)
                else:
                    self._on_worker(wid, msg)
            except (m.MessageError, ValueError) as exc:
                log.error("malformed message from worker %s: %s", wid, exc)

    def _on_worker(self, wid: str, msg: m.Message) -> None:
        w = self.sched.workers.get(wid)
        if w is not None:
            w.last_seen = time.monotonic()
        kind = msg.kind
        if kind is m.Kind.READY:
            info = msg.json()
            requeued, failed = self.sched.add_worker(WorkerState(
                id=wid, slots=int(info["slots"]), name=str(info.get("name", wid)),
                pid=int(info.get("pid", 0)),
                model=str(info.get("model", "")), device=str(info.get("device", "cpu")),
                n_ctx=int(info.get("n_ctx", 0))))
            self._fail_orphans(wid, "it restarted", requeued, failed)
            self.lost.pop(wid, None)
            log.info("worker %s ready (pid %s, %s slot(s))", wid, info.get("pid"), info["slots"])
            self._wake.set()
        elif w is None:
            if kind is not m.Kind.BYE:
                # Traffic from a worker we do not know (we restarted): it must say READY.
                log.info("unknown worker %s: asking it to reconnect", wid)
        elif kind is m.Kind.TOKEN and msg.rid is not None:
            req = w.inflight.get(msg.rid)
            if req is not None and not req.finished:
                now = time.monotonic()
                if req.t_first is None:
                    req.t_first = now
                gap = (now - req.t_last) * 1000 if req.t_last is not None else None
                req.t_last = now
                if not req.internal:
                    self.metrics.on_token(w.name, gap, now)
                req.pieces += 1
                if req.pieces - req.granted >= self.window and req.stalled_since is None:
                    req.stalled_since = now     # the worker may send no more: paused
                req.sink.on_token(req, msg.text())
        elif kind is m.Kind.PARKED and msg.rid is not None:
            req = self.sched.park(wid, msg.rid)
            if req is not None:
                self.counters["parked"] += 1
                if req.stalled_since is None:   # credit came meanwhile: run it again
                    self.sched.want_resume(req)
            self._wake.set()
        elif kind in (m.Kind.DONE, m.Kind.ERROR) and msg.rid is not None:
            req = self.sched.complete(wid, msg.rid)
            body = msg.json()
            held = body.pop("prefix_hashes", None)     # what the worker's prompt cache holds
            if isinstance(held, list):
                w.prefixes = set(held)
            store = body.pop("kv_store", None)
            if isinstance(store, dict):
                w.kv_store = store
            if req is not None:
                if kind is m.Kind.DONE and not req.internal:
                    self.counters["prompt_tokens"] += int(body.get("prompt_tokens") or 0)
                    self.counters["cache_hit_tokens"] += int(body.get("cached_tokens") or 0)
                if req.finished and body.get("finish_reason") == "cancelled":
                    phase = body.get("phase")   # where the worker was when it stopped
                    if phase in ("prefill", "decode"):
                        self.counters[f"cancelled_{phase}"] += 1
                if kind is m.Kind.DONE:
                    body["worker"] = w.name
                    self._finish(req, stats=body)
                else:
                    self._finish(req, err=from_code(str(body.get("code")),
                                                    str(body.get("message", ""))))
            self._wake.set()
        elif kind is m.Kind.BYE:
            self.worker_lost(wid, "worker left")

    async def _ticker(self) -> None:
        """Heartbeats to workers, liveness of workers, deadlines."""
        liveness = self.interval * self.cfg.workers.liveness
        while True:
            await asyncio.sleep(min(self.interval, 0.1))
            now = time.monotonic()
            for req in self.sched.expire_queued(now):
                self.counters["expired_queued"] += 1
                self._finish(req, err=DeadlineExceeded("deadline passed while queued"))
            for req in self.sched.expired_running(now):
                if not req.internal:
                    self.counters["expired_running"] += 1
                self._stop_work(req)
                self._finish(req, err=DeadlineExceeded("deadline passed while running"))
            self._check_stalled(now)
            for w in list(self.sched.workers.values()):
                if now - w.last_seen > liveness:
                    self.worker_lost(w.id, f"silent for {now - w.last_seen:.1f}s")
                elif self.probe_interval and not w.inflight and not w.draining \
                        and now - w.last_busy >= self.probe_interval:
                    self._probe(w)
            if now - getattr(self, "_last_hb", 0.0) >= self.interval:
                self._last_hb = now
                for wid in list(self.sched.workers):
                    self._send(wid, m.encode(m.Kind.HEARTBEAT))

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
                    self.counters["slow_clients"] += 1
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
                    self._send(w.id, m.encode(m.Kind.PARK, req.rid))

    def _probe(self, w: WorkerState) -> None:
        """Deep probe of an idle worker: a real 1-token generation with a deadline."""
        req = Request(params=self._probe_params, sink=_ProbeSink(self, w.id), internal=True)
        self.sched.assign(w, req)
        self.counters["probes"] += 1
        self._send(w.id, m.encode(m.Kind.GENERATE, req.rid, req.params.worker_fields()))

    # ---- status ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "pid": os.getpid(), "listening": self.listening,
            "http_listening": self.http_listening, "model": self.model_name,
            "metrics_url": self.metrics_url,
            "draining": self.sched.draining, "queue": len(self.sched.queue),
            "max_queue": self.sched.max_queue, "inflight": self.sched.inflight_count(),
            "parked": self.sched.parked_count(),
            "open": self.sched.open_count(), "connections": self.connections,
            "counters": dict(self.counters), "errors": dict(self.errors),
            "workers": [w.snapshot(now) for w in self.sched.workers.values()],
            "lost": dict(self.lost),
            "metrics": self.metrics.snapshot(now),
            "free_credits": sum(w.available for w in self.sched.workers.values()),
        }

    def handle_admin(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "drain":
            self.sched.draining = True
            log.info("draining: new requests are refused")
            return {"ok": True, **self.status()}
        if cmd == "worker_exited":
            self.worker_lost(str(req.get("worker")), str(req.get("why", "exited")))
            self.lost.pop(str(req.get("worker")), None)   # the supervisor knows already
            return {"ok": True}
        if cmd == "drain_worker":
            w = self.sched.workers.get(str(req.get("worker")))
            if w is None:
                return {"ok": False, "error": f"no worker {req.get('worker')!r}"}
            w.draining = True
            self._send(w.id, m.encode(m.Kind.DRAIN))
            return {"ok": True, "inflight": len(w.inflight) + len(w.parked)}
        if cmd == "procs":
            self.procs = dict(req.get("procs", {}))
            return {"ok": True}
        if cmd == "set_defaults":
            self.defaults = Defaults(**req["defaults"])
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ---- lifecycle ------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from aiohttp import web

        from llmctl.dataplane.http import build_app, serve_http
        from llmctl.dataplane.prom import add_metrics_route
        from llmctl.dataplane.tcp import serve_tcp

        router = self.ctx.socket(zmq.ROUTER)
        admin = self.ctx.socket(zmq.REP)
        tasks: list[asyncio.Task] = []
        server = None
        http = None
        try:
            for s in (router, admin):
                s.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)   # unroutable = error, not a drop
            # Outbound per worker is bounded by its credits plus control messages.
            router.setsockopt(zmq.SNDHWM, 10_000)
            router.setsockopt(zmq.RCVHWM, 100_000)
            bind_private(router, self.cfg.workers_endpoint)
            self.router = router
            server = await serve_tcp(self)
            # One HTTP server: the OpenAI front when enabled, /metrics always.
            app = build_app(self) if self.cfg.http.enabled else web.Application()
            add_metrics_route(app, self)
            http = await serve_http(self, app)
            self.metrics_url = f"http://{self.cfg.http.host}:{self.cfg.http.port}/metrics"
            if not self.cfg.http.enabled:
                self.http_listening = []
            bind_private(admin, self.cfg.admin_endpoint)
            tasks = [asyncio.create_task(c) for c in
                     (self._sender(), self._receiver(), self._ticker(), self._admin(admin))]
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception():
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            if server is not None:
                server.close()
            if http is not None:
                await http.cleanup()
            router.close(linger=0)
            admin.close(linger=0)

    async def _admin(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            raw = await sock.recv()
            try:
                reply = self.handle_admin(m.parse(raw))
            except m.MessageError as exc:
                reply = {"ok": False, "error": str(exc)}
            await sock.send_json(reply)


class _ProbeSink:
    """Receives a deep probe's outcome: any error means the worker cannot serve."""

    def __init__(self, gw: Gateway, wid: str) -> None:
        self.gw = gw
        self.wid = wid

    def on_token(self, req: Request, text: str) -> None:
        pass

    def on_done(self, req: Request, stats: dict[str, Any]) -> None:
        pass

    def on_error(self, req: Request, err: LlmctlError) -> None:
        self.gw.counters["probes_failed"] += 1
        self.gw.worker_lost(self.wid, f"deep probe failed: {err.code.value}: {err.message}")
