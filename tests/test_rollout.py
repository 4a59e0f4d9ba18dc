"""The shared core: typed internal messages at every socket, events, desired state.

* Garbage and truncated internal messages sent to the gateway (on the workers' socket)
  and to the supervisor (on its control socket) are dropped, counted and answered where
  a reply is due; both keep serving.
* A gateway that stops answering the supervisor's pings (SIGSTOP) is killed and
  restarted; the workers reconnect and requests are served again.
* ``Rollout`` converges the workers to their desired configs (pure state: fake
  processes), with a surge for a reload and in place for the governor.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal

import msgspec
import pytest
import zmq

from llmctl.common.config import Config
from llmctl.control.rollout import Rollout
from tests.fakes import illegal_transitions
from tests.service import Service, wait_until

GARBAGE_FROM_A_WORKER = [
    [b"Z", b"", b""],                                   # an unknown kind
    [b"R", b"", b"{not json"],                          # READY that is not JSON
    [b"R", b"", b'{"worker": "x"}'],                    # READY without its fields
    [b"R", b"", b'{"worker": "x", "pid": "one", "slots": 2}'],   # a wrong type
    [b"M", b"", b"\x54\x00\x00"],                       # a truncated BATCH
    [b"G", b"\x00" * 8, b"{}"],                         # a kind workers never send
    [b"T", b"\x00\x01", b"x"],                          # a request id of 2 bytes
    [b"D"],                                             # one frame
]


@pytest.fixture(scope="module")
def svc():
    s = Service(workers={"count": 1, "slots": 2, "heartbeat_interval_s": 0.5, "liveness": 4})
    r = s.start()
    assert r.returncode == 0, r.stdout + r.stderr
    yield s
    s.stop()


def served(s: Service) -> None:
    with s.client() as c:
        r = c.complete(1, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert r.done is not None and r.done["completion_tokens"] == 3, r


@pytest.mark.integration
def test_the_gateway_drops_garbage_from_a_worker_and_serves_on(svc):
    gw_pid = svc.status()["gateway"]["pid"]
    before = svc.counters()["dropped_messages"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"impostor.1")
    try:
        sock.connect(f"ipc://{svc.dir / 'run' / 'workers.sock'}")
        for frames in GARBAGE_FROM_A_WORKER:
            sock.send_multipart(frames)
        wait_until(lambda: svc.counters()["dropped_messages"] >= before + 5, 10,
                   "the malformed messages to be counted")
    finally:
        sock.close(linger=0)
        ctx.term()
    st = svc.status()
    assert st["gateway"]["pid"] == gw_pid and len(st["workers"]) == 1
    served(svc)


@pytest.mark.integration
def test_the_supervisor_answers_garbage_on_its_control_socket(svc):
    ctx = zmq.Context()
    try:
        for raw in (b"garbage", b'{"kind": "no_such_command"}', b'{"kind": "restart",'
                    b' "workers": "w0"}', b"[]"):
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{svc.dir / 'run' / 'control.sock'}")
            sock.send(raw)
            assert sock.poll(5000), f"no answer to {raw!r}"
            reply = json.loads(sock.recv())
            sock.close(linger=0)
            assert reply["ok"] is False and reply["error"], reply
    finally:
        ctx.term()
    assert svc.status()["running"]
    served(svc)


@pytest.mark.integration
def test_a_gateway_that_stops_answering_is_restarted(make_service):
    s = make_service(workers={"heartbeat_interval_s": 0.5, "liveness": 4},
                     control={"backoff_initial_s": 0.1, "backoff_max_s": 0.5})
    assert s.start().returncode == 0
    served(s)
    gw = s.status()["gateway"]
    os.kill(gw["pid"], signal.SIGSTOP)          # hung: alive, silent
    wait_until(lambda: (lambda g: g["pid"] not in (None, gw["pid"]) and g["restarts"] == 1
                        and g["listening"])(s.status()["gateway"]), 60,
               "the supervisor to kill the hung gateway and start another")
    wait_until(lambda: all(w["state"] == "ready" for w in s.status()["workers"]), 60,
               "the workers to reconnect to the new gateway")
    served(s)
    assert s.status()["gateway"]["last_exit"] == "killed by SIGKILL"


# ---- Rollout: desired state, pure ----------------------------------------------------------

class FakeWorker:
    """A WorkerProcess as Rollout sees it: started, ready, drained, stopped on command."""
    made: list["FakeWorker"] = []

    def __init__(self, name: str, cfg: Config) -> None:
        self.name, self.cfg = name, cfg
        self.pid: int | None = None
        self.was_ready = self.drained = False
        self.state, self.tail = "stopped", []
        self.routing_id = f"{name}.{len(FakeWorker.made) + 1}"
        FakeWorker.made.append(self)

    async def start(self) -> None:
        self.pid, self.state = 1000 + len(FakeWorker.made), "starting"

    async def stop(self, timeout: float) -> None:
        self.pid, self.state = None, "stopped"


def with_layers(cfg: Config, n: int) -> Config:
    return msgspec.structs.replace(cfg, model=msgspec.structs.replace(cfg.model, n_gpu_layers=n))


def run_rollout(cfg: Config, script) -> tuple[Rollout, list[tuple[str, str]]]:
    """Drive a Rollout tick by tick; ``script(rollout, tick)`` plays the processes' part
    (they get ready, the gateway says they drained).  Returns it and what the gateway was
    told; every phase change it made was legal."""
    told: list[tuple[str, str]] = []
    FakeWorker.made = []

    async def main() -> Rollout:
        r = Rollout(cfg, drain=lambda w: told.append(("drain", w.routing_id)),
                    forget=lambda w, why: told.append(("forget", w.routing_id)),
                    spawn=FakeWorker)
        r.want(cfg)
        for tick in range(200):
            await r.step()
            await asyncio.sleep(0)
            script(r, tick)
            if tick > 2 and r.converged:
                break
        return r

    with illegal_transitions() as illegal:
        r = asyncio.run(main())
    assert not illegal
    return r, told


def ready_all(r: Rollout, tick: int) -> None:
    for w in FakeWorker.made:
        if w.pid is not None:
            w.was_ready = True


def test_rollout_starts_what_is_missing_and_replaces_one_at_a_time_with_a_surge():
    base = Config()
    base = msgspec.structs.replace(base, workers=msgspec.structs.replace(base.workers, count=2))
    new = with_layers(base, 0)
    phases: list[str] = []

    def script(r: Rollout, tick: int) -> None:
        ready_all(r, tick)
        if tick == 3:
            r.want(new)                       # a reload
        for w in r.retiring:
            w.drained = True                  # the gateway says so
        phases.append(r.step_text())
        assert len([w for w in r.all() if w.pid]) <= 3     # at most one surge at a time

    r, told = run_rollout(base, script)
    assert r.converged and {n: w.cfg for n, w in r.workers.items()} == {"w0": new, "w1": new}
    assert [x for x in phases if x][0].startswith("starting new w0")
    # The old w0 and w1 were drained, then forgotten, each after its successor was ready.
    assert told == [("drain", "w0.1"), ("forget", "w0.1"), ("drain", "w1.2"), ("forget", "w1.2")]


def test_rollout_replaces_in_place_for_the_governor():
    base = Config()
    events: list[str] = []

    def script(r: Rollout, tick: int) -> None:
        ready_all(r, tick)
        if tick == 3:
            r.want_one("w0", with_layers(base, 10))
        for w in r.retiring:
            w.drained = True
        live = [w.routing_id for w in FakeWorker.made if w.pid]
        events.append(",".join(live))

    r, told = run_rollout(base, script)
    assert r.workers["w0"].cfg.model.n_gpu_layers == 10 and r.converged
    assert told == [("drain", "w0.1"), ("forget", "w0.1")]
    assert "w0.1,w0.2" not in events          # never both at once: the old freed its memory first


def test_a_surge_that_never_gets_ready_is_aborted_and_the_old_worker_serves_on():
    base = Config()
    bad = with_layers(base, 0)

    def script(r: Rollout, tick: int) -> None:
        first = FakeWorker.made[0]
        first.was_ready = True
        if tick == 3:
            r.want(bad)
        if len(FakeWorker.made) > 1 and tick == 6:
            FakeWorker.made[1].pid = None     # the new process died before READY

    r, told = run_rollout(base, script)
    assert r.failed and "did not become ready" in r.failed
    assert r.workers["w0"] is FakeWorker.made[0] and r.desired["w0"] == base
    assert told == []
