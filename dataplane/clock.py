"""The core's clock: what happens because time passed, a few times a second (``tick``).

* Deadlines: a request past its ``deadline_ms`` ends ``timeout``, queued or running.
* Slow clients: a stream whose client takes no output (its token window spent) is parked
  after ``[gateway] park_after_s`` (its worker frees the slot for others and resumes it
  when the client reads) and ended ``slow_client`` after ``slow_client_timeout_s`` (the
  client finds its ERROR when it reads again).  One rule for every front.
* Liveness: a worker silent for ``heartbeat_interval_s x liveness`` is lost.
* Deep probes: an idle worker gets a real one-token generation every
  ``probe_interval_s``; any error means it cannot serve.
"""
from __future__ import annotations

import logging
from typing import Any

from llmctl.common import messages as m
from llmctl.common.errors import DeadlineExceeded, LlmctlError, SlowClient
from llmctl.dataplane.gateway import Gateway
from llmctl.dataplane.scheduler import WorkerState
from llmctl.dataplane.streams import Stream

log = logging.getLogger(__name__)

PARKED_PER_SLOT = 8      # a worker keeps at most slots x this many parked requests


def tick(gw: Gateway, now: float) -> None:
    """Deadlines, stalled streams, liveness of workers, deep probes."""
    for sched in gw.sched:
        for s in sched.expire_queued(now):
            gw.counters.expired_queued += 1
            gw.end(s, DeadlineExceeded(
                "deadline passed while queued" if sched.ready else
                f"deadline passed while queued: model {sched.model!r} was not loaded in time"))
        for s in sched.expired_running(now):
            if not s.internal:
                gw.counters.expired_running += 1
            gw.end(s, DeadlineExceeded("deadline passed while running"))
    check_stalled(gw, now)
    gw.tenancy.fold(now)
    if gw.fairness.fair and any(sched.queue or any(w.resumes for w in sched.workers.values())
                                for sched in gw.sched):
        gw.wake.set()       # waiting work: a running request may now have run enough to yield
    liveness = gw.interval * gw.cfg.workers.liveness
    probe_every = gw.cfg.workers.probe_interval_s
    for w in list(gw.sched.workers.values()):
        if not gw.knows(w.id):
            continue                        # lost meanwhile
        if now - w.last_seen > liveness:
            gw.worker_lost(w.id, f"silent for {now - w.last_seen:.1f}s")
        elif probe_every and not w.inflight and not w.draining \
                and now - w.last_busy >= probe_every:
            probe(gw, w)


def check_stalled(gw: Gateway, now: float) -> None:
    """Park, then end, the streams whose clients take no output."""
    g = gw.cfg.gateway
    for w in gw.sched.workers.values():
        for s in [*w.inflight.values(), *w.parked.values()]:
            since = s.stalled_since
            if since is None or s.finished:
                continue
            if now - since >= g.slow_client_timeout_s:
                gw.counters.slow_clients += 1
                log.info("stream %d took no output for %.1fs: cancelled (slow_client)",
                         s.tag, now - since)
                gw.end(s, SlowClient(
                    f"the client took no output for {g.slow_client_timeout_s:g}s; "
                    "the request was cancelled and its slot freed"))
            elif g.park_after_s and not s.parked and not s.park_sent \
                    and now - since >= g.park_after_s \
                    and len(w.parked) < w.slots * PARKED_PER_SLOT:
                s.park_sent = True
                gw.send(w.id, m.encode(m.Kind.PARK, s.rid))


def probe(gw: Gateway, w: WorkerState) -> None:
    """Deep probe of an idle worker: a real 1-token generation with a deadline."""
    s = Stream(request=gw.probe_request, out=_ProbeOutput(gw, w.id), internal=True)
    gw.assign(w, s)
    gw.counters.probes += 1
    gw.send(w.id, m.generate(s.rid, s.request))


class _ProbeOutput:
    """Receives a deep probe's outcome: any error means the worker cannot serve."""

    def __init__(self, gw: Gateway, wid: str) -> None:
        self.gw = gw
        self.wid = wid

    def token(self, s: Stream, text: str) -> None:
        return None

    def logprobs(self, s: Stream, content: list[dict[str, Any]]) -> None:
        return None

    def done(self, s: Stream, fin: m.Finished) -> None:
        return None

    def error(self, s: Stream, err: LlmctlError) -> None:
        self.gw.counters.probes_failed += 1
        self.gw.worker_lost(self.wid, f"deep probe failed: {err.code.value}: {err.message}")
