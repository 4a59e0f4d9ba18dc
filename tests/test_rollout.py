"""``Rollout`` converges the workers to their desired configs, with a surge for a reload
and in place for the governor: pure state, fake processes, a tick at a time."""
from __future__ import annotations

import asyncio

import msgspec

from llmctl.common.config import Config
from llmctl.control.rollout import Rollout
from tests.fakes import illegal_transitions


class FakeWorker:
    """A WorkerProcess as Rollout sees it: started, ready, drained, stopped on command."""
    made: list["FakeWorker"] = []

    def __init__(self, name: str, cfg: Config) -> None:
        self.name, self.cfg = name, cfg
        self.pid: int | None = None
        self.was_ready = self.drained = False
        self.tail: list[str] = []
        self.routing_id = f"{name}.{len(FakeWorker.made) + 1}"
        FakeWorker.made.append(self)

    async def start(self) -> None:
        self.pid = 1000 + len(FakeWorker.made)

    async def stop(self, timeout: float) -> None:
        self.pid = None


def with_layers(cfg: Config, n: int) -> Config:
    return msgspec.structs.replace(cfg, model=msgspec.structs.replace(cfg.model, n_gpu_layers=n))


def want_all(r: Rollout, cfg: Config) -> None:
    """Every worker of ``cfg.workers.count`` on ``cfg``: what a reload wants."""
    r.want_workers({f"w{i}": cfg for i in range(cfg.workers.count)})


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
        want_all(r, cfg)
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
            want_all(r, new)                  # a reload
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
            want_all(r, bad)
        if len(FakeWorker.made) > 1 and tick == 6:
            FakeWorker.made[1].pid = None     # the new process died before READY

    r, told = run_rollout(base, script)
    assert r.failed and "did not become ready" in r.failed
    assert r.workers["w0"] is FakeWorker.made[0] and r.desired["w0"] == base
    assert told == []
