"""Worker process: loads the model, connects a DEALER to the gateway's ROUTER, serves.

The loop alternates between the socket and one engine step, so CANCEL, DRAIN and
heartbeats are read between prefill chunks and between decoded tokens.  The worker
announces its credits (free slots) in READY; each DONE or ERROR gives one back.

Liveness (Paranoid Pirate): the worker sends HEARTBEAT every interval when it has
sent nothing else; if it hears nothing from the gateway for ``liveness`` intervals
it drops what it runs, reconnects and sends READY again.

On a node (``[node] join``) the DEALER connects to the head over TCP as a CURVE client
(its own keypair, the head's pinned public key), and the worker reports its link state
(connecting, joined, lost, refused) to its supervisor (``admin.LinkReport``).  A link that
drops for less than the liveness bound loses nothing: ZeroMQ reconnects and what was
queued flows on; a longer silence is a lost link: what runs is dropped (the gateway has
re-dispatched or failed it) and READY is sent again, so no request is answered twice.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from llmctl.common import admin, keys
from llmctl.common.config import Config
from llmctl.common.procs import CONFIG_JSON_ENV, EXIT_CONFIG, setup_child_logging
from llmctl.common import messages as m
from llmctl.common.errors import InternalError, LlmctlError
from llmctl.common.request import GenRequest
from llmctl.worker.engine import Event, ModelLoadError, ModelRefused

log = logging.getLogger(__name__)

TCP_RECONNECT_MAX_MS = 2000


class Worker:
    def __init__(self, cfg: Config, worker_id: str, endpoint: str, engine: Any,
                 report: str | None = None) -> None:
        self.cfg = cfg
        self.report_endpoint = report
        self._reporter: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.link_state = ""
        self.drain_requested = False    # a node's supervisor asks (SIGUSR1): finish, then idle
        self._drain_told = False
        self.id = worker_id
        self.endpoint = endpoint
        self.engine = engine
        self.stop_requested = False
        self.dropped = 0            # malformed messages from the gateway
        self.interval = cfg.workers.heartbeat_interval_s
        self.liveness = cfg.workers.liveness
        self._ppid = os.getppid()

    # ---- socket lifecycle -------------------------------------------------------------
    def _connect(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.id.encode())
        # Our outbound traffic is bounded by our slots; keep the HWMs generous but finite.
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        n = self.cfg.node
        if self.endpoint.startswith("tcp://") and n.secret_key:
            fp = keys.client_options(sock, n.secret_key, n.head_key)
            log.info("CURVE to %s: node key %s, head key %s pinned", self.endpoint, fp,
                     keys.fingerprint(keys.load_public(n.head_key)))
        if self.endpoint.startswith("tcp://"):
            # A connect lost in a dead link is abandoned and tried again (ZeroMQ
            # reconnects by itself), so the node rejoins soon after the link is back.
            sock.setsockopt(zmq.CONNECT_TIMEOUT, int(n.connect_timeout_s * 1000))
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, TCP_RECONNECT_MAX_MS)
            self._monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        return sock

    def _close(self, sock: zmq.Socket) -> None:
        if self._monitor is not None:
            sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        sock.close(linger=0)

    def _report(self, state: str, detail: str = "") -> None:
        """Tell the node's supervisor how the link to the head stands (on a change)."""
        if state == self.link_state:
            return
        self.link_state = state
        level = logging.WARNING if state in ("lost", "refused") else logging.INFO
        log.log(level, "link to %s: %s%s", self.endpoint, state, f" ({detail})" if detail else "")
        if self._reporter is not None:
            self._reporter.send(admin.encode(admin.LinkReport(
                worker=self.id, pid=os.getpid(), state=state, detail=detail)), zmq.NOBLOCK)

    def _on_monitor(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            ev = recv_monitor_message(self._monitor)["event"]
            if ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._report("refused", "the head refused this node's CURVE key")
            elif ev in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._report("refused", "security handshake failed (CURVE on one side only, "
                                        "or the pinned head key is not the head's)")
            elif ev == zmq.EVENT_DISCONNECTED and self.link_state == "joined":
                log.warning("TCP connection to %s dropped: ZeroMQ reconnects", self.endpoint)

    def _ready_msg(self) -> list[bytes]:
        e = self.engine
        return m.ready(m.ReadyInfo(worker=self.id, name=self.id.split(".")[0], pid=os.getpid(),
                                   slots=e.capacity, model=e.model_name, n_ctx=e.n_ctx,
                                   device=e.device, node=self.cfg.node_name,
                                   served=self.cfg.default_model.name,
                                   threads=_threads(e), props=getattr(e, "props", {})))

    def run(self) -> int:
        ctx = zmq.Context()
        if self.report_endpoint:
            self._reporter = ctx.socket(zmq.PUSH)
            self._reporter.setsockopt(zmq.LINGER, 0)
            self._reporter.connect(self.report_endpoint)
        sock = self._connect(ctx)
        try:
            sock.send_multipart(self._ready_msg())
            log.info("worker %s ready: model %s, device %s, %d slot(s), gateway %s",
                     self.id, self.engine.model_name, self.engine.device,
                     self.engine.capacity, self.endpoint)
            sock = self._loop(ctx, sock)
            sock.send_multipart(m.encode(m.Kind.BYE), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("socket error at exit: %s", exc)
        finally:
            self._close(sock)
            if self._reporter is not None:
                self._reporter.close(linger=0)
            ctx.term()
        return 0

    def _loop(self, ctx: zmq.Context, sock: zmq.Socket) -> zmq.Socket:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        self._report("connecting")
        last_sent = last_heard = time.monotonic()
        while not self.stop_requested:
            # Block on the socket only when no step would make progress (idle, or
            # every sequence paused for want of token credit).
            timeout_ms = 0 if self.engine.runnable else int(self.interval * 1000 / 2)
            events = dict(poller.poll(timeout_ms))
            if sock in events:
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard = time.monotonic()
                    if self.link_state != "joined":
                        self._report("joined")
                    for out in self._handle(frames):
                        sock.send_multipart(out)
                        last_sent = time.monotonic()
            if self._monitor is not None and self._monitor in events:
                self._on_monitor()
            now = time.monotonic()
            # Judge the gateway only after reading what is queued: a long step of
            # our own is not the gateway's silence.
            if now - last_heard > self.interval * self.liveness:
                log.warning("gateway silent for %.1fs: reconnecting", now - last_heard)
                if self.link_state == "joined":
                    self._report("lost", f"silent for {now - last_heard:.1f}s")
                self._drop_active()
                poller.unregister(sock)
                if self._monitor is not None:
                    poller.unregister(self._monitor)
                self._close(sock)
                sock = self._connect(ctx)
                poller.register(sock, zmq.POLLIN)
                if self._monitor is not None:
                    poller.register(self._monitor, zmq.POLLIN)
                if self.link_state != "refused":
                    self._report("connecting")
                sock.send_multipart(self._ready_msg())
                last_sent = last_heard = time.monotonic()
                continue
            if now - last_sent >= self.interval:      # before a step that may be long
                sock.send_multipart(m.encode(m.Kind.HEARTBEAT))
                last_sent = now
            if self.drain_requested:
                self._drain(sock)
            records = [r for ev in self.engine.step() for r in self._records(ev)]
            if records:       # one message per step, whatever the number of sequences
                sock.send_multipart(m.encode_batch(records))
                last_sent = time.monotonic()
            if os.getppid() != self._ppid:
                log.error("supervisor is gone: exiting")
                break
        return sock

    def _drain(self, sock: zmq.Socket) -> None:
        """Tell the gateway once to send nothing new; report drained once nothing is held."""
        if not self._drain_told:
            self._drain_told = True
            sock.send_multipart(m.encode(m.Kind.DRAINING))
            log.info("draining: finishing %d request(s)", len(self.engine.running)
                     + len(self.engine.parked))
        if not self.engine.running and not self.engine.parked and self.link_state != "drained":
            self._report("drained")

    def _drop_active(self) -> None:
        for rid in [*self.engine.running, *self.engine.parked,
                    *getattr(self.engine, "embedding", ())]:
            self.engine.cancel(rid)

    # ---- messages ---------------------------------------------------------------------
    def _handle(self, frames: list[bytes]) -> list[list[bytes]]:
        """One message from the gateway, decoded and validated here, once; what to send."""
        try:
            msg = m.from_gateway(frames)
        except m.MessageError as exc:
            self.dropped += 1
            log.error("dropped a malformed message from the gateway: %s", exc)
            return []
        match msg:
            case m.Generate(rid=rid, request=req):
                return self._generate(rid, req)
            case m.Invalid(rid=rid, why=why):
                self.dropped += 1
                log.error("request %d: %s", rid, why)
                return [m.error(rid, InternalError(f"the worker got a malformed request: {why}"))]
            case m.Cancel(rid=rid):
                ev = self.engine.cancel(rid)
                return [m.encode_batch(self._records(ev))] if ev else []
            case m.Credit(grants=grants):
                for rid, n in grants:
                    self.engine.grant(rid, n)
            case m.Park(rid=rid, yields=yields):
                if self.engine.park(rid, yields):
                    return [m.encode_batch([(m.Kind.PARKED, rid, b"")])]
            case m.Resume(rid=rid):
                try:
                    self.engine.resume(rid)
                except LlmctlError as exc:
                    return [m.error(rid, exc)]
        return []  # HEARTBEAT, DRAIN (the gateway sends nothing new): liveness already noted

    def _generate(self, rid: int, req: GenRequest) -> list[list[bytes]]:
        """Start a request.  Whatever goes wrong with it ends it alone, with an ERROR
        (``bad_request`` for what the model refuses, ``internal`` for anything else):
        no request can take the worker down."""
        try:
            if req.tokenize or req.detokenize is not None:    # answered at once, no slot
                return [m.encode_batch([(m.Kind.DONE, rid, m.body(self.engine.utility(req)))])]
            self.engine.start(self.engine.prepare(rid, req))
        except LlmctlError as exc:
            return [m.error(rid, exc)]
        except Exception as exc:
            log.exception("request %d could not be started", rid)
            return [m.error(rid, InternalError(f"the worker could not start this request: "
                                               f"{type(exc).__name__}: {exc}"))]
        return []

    @staticmethod
    def _records(ev: Event) -> list[tuple[m.Kind, int, bytes]]:
        """The TOKEN / DONE / ERROR records of an engine event (for a BATCH)."""
        out = []
        if ev.logprobs:     # before the TOKEN (or DONE) whose tokens they describe
            out.append((m.Kind.LOGPROBS, ev.rid, m.dumps({"content": ev.logprobs})))
        if ev.text:
            out.append((m.Kind.TOKEN, ev.rid, ev.text.encode("utf-8")))
        if ev.error is not None:
            out.append((m.Kind.ERROR, ev.rid, m.error(ev.rid, ev.error)[2]))
        elif ev.done is not None:
            out.append((m.Kind.DONE, ev.rid, m.body(ev.done)))
        return out


def _threads(engine: Any) -> m.ComputeThreads | None:
    gov = getattr(engine, "threads", None)
    return m.ComputeThreads(**gov.info()) if gov is not None else None


def make_engine(cfg: Config) -> Any:
    """The engine ``[model] engine`` names: llama.cpp's batching engine, or the synthetic one."""
    if cfg.model.engine == "synthetic":
        from llmctl.worker.synthetic import SyntheticEngine
        log.info("synthetic engine: %g ms a step, %d slot(s)", cfg.synthetic.step_ms,
                 cfg.workers.slots)
        return SyntheticEngine(cfg.synthetic, cfg.model.n_ctx, cfg.workers.slots,
                               model_name=os.path.basename(cfg.model.path).removesuffix(".gguf"))
    from llmctl.worker.batch import BatchEngine
    threads = cfg.worker_threads()
    m = cfg.model
    d = cfg.entry(cfg.default_model.draft) if m.speculative == "draft" else None
    log.info("loading %s (n_ctx=%d, n_gpu_layers=%d, threads=%d %s, slots=%d, KV %s/%s, "
             "flash_attn %s)", m.path, m.n_ctx, m.n_gpu_layers, threads, cfg.host.threads_policy,
             cfg.workers.slots, m.cache_type_k, m.cache_type_v, m.flash_attn)
    return BatchEngine(cfg.model.path, cfg.model.n_ctx, cfg.model.n_gpu_layers, threads,
                       cfg.model.n_batch, slots=cfg.workers.slots,
                       prompt_cache=cfg.workers.prompt_cache,
                       prompt_cache_bytes=cfg.workers.prompt_cache_mib << 20,
                       embeddings=cfg.workers.embeddings,
                       threads_policy=cfg.host.threads_policy,
                       spec_max_draft=m.spec_max_draft if m.speculative != "off" else 0,
                       cache_type_k=m.cache_type_k, cache_type_v=m.cache_type_v,
                       flash_attn=m.flash_attn,
                       draft=(d.name, d.path, d.n_gpu_layers) if d is not None else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmctl-worker")
    p.add_argument("--id", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--report", default=None, help="a node's supervisor: link state reports")
    args = p.parse_args(argv)
    cfg = Config.from_json(os.environ[CONFIG_JSON_ENV])
    setup_child_logging(f"worker {args.id}")

    worker: Worker | None = None
    stop: dict[str, bool] = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["flag"] = True
        if worker is not None:
            worker.stop_requested = True

    def on_drain(signum: int, _frame: object) -> None:
        stop["drain"] = True
        if worker is not None:
            worker.drain_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_drain)

    t0 = time.monotonic()
    try:
        engine = make_engine(cfg)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG if isinstance(exc, ModelRefused) else 2
    # Warm-up: one real token, so READY means "serves", not only "loaded".
    warm = engine.prepare(0, GenRequest(prompt="Hello", max_tokens=1))
    engine.start(warm)
    while engine.active is not None:
        engine.step()
    log.info("model loaded and warmed up in %.2fs", time.monotonic() - t0)
    if stop["flag"]:
        return 0
    worker = Worker(cfg, args.id, args.endpoint, engine, report=args.report)
    worker.drain_requested = stop.get("drain", False)   # asked while it was loading
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
