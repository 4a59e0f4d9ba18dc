"""The supervisor as state: the transition tables of what it manages, the models' states
following their workers the moment they are ready, the reload, and what status reports.

No process runs: a worker's process is a stand-in, and the gateway's end of the link
answers at once."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from llmctl.common import admin, config
from llmctl.control import node, status
from llmctl.control.child import ChildProcess, WorkerProcess
from llmctl.control.reload import diff_configs
from llmctl.control.states import (LEGAL, ModelState, ProcessState, ReloadState, RolloutPhase,
                                   is_legal, move)
from llmctl.control.supervisor import Supervisor
from tests.fakes import illegal_transitions
from tests.test_models_config import TWO

KINDS = [ProcessState, ModelState, RolloutPhase, ReloadState]

ON_DEMAND = """
[[models]]
name = "a"
path = "a.gguf"
load = "on_demand"
[[models]]
name = "b"
path = "b.gguf"
load = "on_demand"
"""
NODE = '[node]\njoin = "tcp://127.0.0.1:5555"\nallow_insecure = true\n'


# ---- the transition tables -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_state_has_a_row_and_is_reached_from_the_first(kind):
    table = LEGAL[kind]
    assert set(table) == set(kind)
    assert all(type(t) is kind for targets in table.values() for t in targets)
    seen, todo = set(), [next(iter(kind))]
    while todo:
        s = todo.pop()
        seen.add(s)
        todo += [t for t in table[s] if t not in seen]
    assert seen == set(kind)


def test_the_values_are_the_strings_status_json_prints():
    assert [s.value for s in ProcessState] == ["stopped", "starting", "running", "backoff",
                                               "fatal"]
    assert [s.value for s in ModelState] == ["unloaded", "loading", "loaded", "unloading"]
    assert [s.value for s in RolloutPhase] == ["starting", "draining", "stopping"]
    assert [s.value for s in ReloadState] == ["idle", "rolling", "done", "failed"]


def test_an_illegal_transition_is_logged_with_its_stack_and_still_applies(caplog):
    with caplog.at_level(logging.ERROR, logger="llmctl.control.states"):
        assert move("model x", ModelState.UNLOADED, ModelState.LOADED) is ModelState.LOADED
    [rec] = caplog.records
    assert rec.getMessage() == "illegal state transition of model x: unloaded -> loaded"
    assert "test_supervisor.py" in rec.stack_info


def test_the_legal_transitions_log_nothing(caplog):
    with caplog.at_level(logging.ERROR, logger="llmctl.control.states"):
        for kind in KINDS:
            for old, targets in LEGAL[kind].items():
                assert all(move("x", old, new) is new for new in targets)
    assert not caplog.records
    # the same string in another kind is another state
    assert not is_legal(RolloutPhase.STOPPING, ProcessState.STARTING)


def test_a_process_is_named_in_its_illegal_transition(tmp_path, caplog):
    cfg = config.load(write(tmp_path, ""))
    cfg.log_dir.mkdir(parents=True)
    gw = ChildProcess("gateway", cfg)
    with caplog.at_level(logging.ERROR, logger="llmctl.control.states"):
        gw.reset()                            # not FATAL: nothing to clear, no transition
        gw.to(ProcessState.FATAL)             # stopped -> fatal: not in the table
    assert [r.getMessage() for r in caplog.records] == \
        ["illegal state transition of process gateway.0: stopped -> fatal"]
    assert gw.state is ProcessState.FATAL
    gw.reset()                                # `llmctl restart`
    assert gw.state is ProcessState.BACKOFF


# ---- a supervisor without processes -----------------------------------------------------------

_pids = itertools.count(5000)


class EmptyStream:
    async def readline(self) -> bytes:
        return b""


class StandIn:
    """An asyncio process as ChildProcess reads it: running, silent."""

    def __init__(self) -> None:
        self.pid, self.returncode, self.stdout = next(_pids), None, EmptyStream()

    def kill(self) -> None:
        self.returncode = -9


class Spawned(WorkerProcess):
    async def _spawn(self) -> Any:
        return StandIn()


class FakeLink:
    """The supervisor's end of the gateway link; the gateway answers at once, ``models``
    to ``Models``."""

    def __init__(self) -> None:
        self.told: list[admin.Command] = []
        self.asked: list[admin.Command] = []
        self.models: dict[str, Any] = {}

    def tell(self, cmd: admin.Command) -> None:
        self.told.append(cmd)

    async def call(self, cmd: admin.Command, timeout: float = 1.0) -> admin.Reply:
        self.asked.append(cmd)
        return admin.Reply(data=self.models if isinstance(cmd, admin.Models) else {})


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(f'[control]\nrun_dir = "run"\n{text}')
    return p


def supervisor(tmp_path: Path, text: str = ON_DEMAND) -> tuple[Supervisor, FakeLink]:
    cfg = config.load(write(tmp_path, text))
    cfg.log_dir.mkdir(parents=True)
    sup = Supervisor(cfg)
    sup.link = link = FakeLink()         # type: ignore[assignment]
    if not cfg.is_node:
        sup.gateway_up = admin.GatewayUp(pid=1, listening=["127.0.0.1:1"])
    sup.rollout.spawn = Spawned
    return sup, link


def states(sup: Supervisor) -> dict[str, str]:
    return {m["name"]: m["state"] for m in status.model_rows(sup)}


async def load(sup: Supervisor, name: str) -> WorkerProcess:
    """Ask for ``name``; one tick of the models and the rollout starts its worker."""
    sup.models.want(name)
    await sup._step_models(time.monotonic())
    await sup.rollout.step()
    [w] = [w for w in sup.workers if w.name in sup.models.models[name].names]
    assert w.state is ProcessState.STARTING and states(sup)[name] == "loading"
    return w


def run(coro: Any) -> Any:
    """Run ``coro``; it made no illegal state transition."""
    with illegal_transitions() as illegal:
        out = asyncio.run(coro)
    assert not illegal
    return out


def test_a_model_is_loaded_the_moment_its_worker_is_ready(tmp_path):
    """The gateway serves a worker as soon as its READY arrives and tells the supervisor
    (WorkerReady) before anything it serves can be answered; the model's state follows
    that event, not the next tick, so nobody reads `loading` after the worker answered."""
    async def main() -> None:
        sup, _ = supervisor(tmp_path)
        w = await load(sup, "a")
        sup._on_event(admin.WorkerReady(worker=w.routing_id, pid=w.pid or 0, slots=1))
        assert w.state is ProcessState.RUNNING and w.was_ready
        assert states(sup) == {"a": "loaded", "b": "unloaded"}
    run(main())


def test_on_a_node_a_model_is_loaded_the_moment_its_worker_joined(tmp_path):
    class Reports:
        def __init__(self, *reports: admin.LinkReport) -> None:
            self.raw = [admin.encode(r) for r in reports]

        async def recv(self) -> bytes:
            if not self.raw:
                raise EOFError("no more reports")
            return self.raw.pop(0)

    async def main() -> None:
        sup, _ = supervisor(tmp_path, NODE + ON_DEMAND)
        w = await load(sup, "a")
        report = admin.LinkReport(worker=w.routing_id, pid=w.pid or 0, state="connecting")
        with pytest.raises(EOFError):
            await node.serve_reports(Reports(report), sup._by_routing_id, sup._models_follow)
        assert w.state is ProcessState.RUNNING and states(sup)["a"] == "loading"
        joined = admin.LinkReport(worker=w.routing_id, pid=w.pid or 0, state="joined")
        with pytest.raises(EOFError):
            await node.serve_reports(Reports(joined), sup._by_routing_id, sup._models_follow)
        assert states(sup)["a"] == "loaded"
    run(main())


def test_a_link_report_keeps_its_wire_form():
    raw = b'{"kind":"worker_link","worker":"gpu1/w0.1","pid":7,"state":"joined",' \
          b'"detail":"","id":0}'
    report = admin.LinkReport(worker="gpu1/w0.1", pid=7, state="joined")
    assert admin.encode(report) == raw and admin.decode_link_report(raw) == report
    with pytest.raises(admin.AdminError, match="not a worker link report"):
        admin.decode_link_report(b'{"kind":"worker_link","worker":"w","pid":1,"state":"x"}')


def test_models_asks_the_gateway_first_and_answers_with_its_figures(tmp_path):
    """Asking the gateway orders the answer after every event it sent before."""
    async def main() -> None:
        sup, link = supervisor(tmp_path)
        link.models = {"a": {"workers_ready": 1, "queue": 2, "inflight": 1, "idle_s": 0.0}}
        reply = await sup._command(admin.Models())
        assert reply["ok"] and isinstance(link.asked[-1], admin.Models)
        a = reply["models"][0]
        assert (a["name"], a["workers_ready"], a["queue"], a["inflight"]) == ("a", 1, 2, 1)
    run(main())


def test_status_prints_the_same_strings(tmp_path):
    async def main() -> dict[str, Any]:
        sup, _ = supervisor(tmp_path)
        await load(sup, "b")
        return json.loads(admin.reply_json(True, **status.status(sup, {})))
    st = run(main())
    [w] = st["workers"]
    assert (w["id"], w["state"], w["model"]) == ("w1", "starting", "b")
    assert [m["state"] for m in st["models"]] == ["unloaded", "loading"]
    assert st["gateway"]["state"] == "stopped" and st["reload"] == {"state": "idle"}


# ---- reload ----------------------------------------------------------------------------------

class Converged:
    """A rollout that has reached its desired state."""
    failed = None
    converged = True

    def step_text(self) -> str:
        return ""


def test_reload_applies_model_settings_but_not_a_changed_set_of_names(tmp_path):
    async def main() -> None:
        path = write(tmp_path, TWO)
        sup, link = supervisor(tmp_path, TWO)
        cfg = sup.cfg
        path.write_text(path.read_text().replace("n_ctx = 1024", "n_ctx = 512"))
        r = sup.start_reload()
        assert r["ok"] and r["changed"] == ["models"] and r["not_applied"] == []
        assert r["state"] == "rolling" and r["error"] is None
        assert sup.models.models["chat"].cfg.model.n_ctx == 512
        assert sup.rollout.desired["w0"].model.n_ctx == 512     # chat is always: rolled
        again = sup.start_reload()
        assert again == {"ok": False, "error": "a reload is already running"}
        target = sup.reload.track(Converged())                 # type: ignore[arg-type]
        assert target is not None and target.served[0].n_ctx == 512
        assert sup.reload.view()["state"] == "done"
        # A refused reload changes nothing, the gateway's defaults included.
        path.write_text(path.read_text().replace('name = "code"', 'name = "coder"')
                        + "[generation]\nmax_tokens = 7\n")
        r = sup.start_reload()
        assert not r["ok"] and "needs `llmctl stop` + `llmctl start`" in r["error"]
        assert link.told == [] and sup.reload.view()["state"] == "done"
        assert diff_configs(cfg, config.load(path))[0][0] == "models"
    run(main())


def test_reload_of_tenants_and_scheduling_reconfigures_the_gateway_and_rolls_no_worker(tmp_path):
    async def main() -> None:
        path = write(tmp_path, TWO)
        sup, link = supervisor(tmp_path, TWO)
        before = dict(sup.rollout.desired)
        path.write_text(path.read_text() + '[scheduling]\npolicy = "fifo"\n'
                        '[[tenants]]\nname = "team"\nkeys = ["k"]\n')
        r = sup.start_reload()
        assert r["ok"] and r["changed"] == ["tenants", "scheduling.policy"]
        assert r["not_applied"] == []
        assert sup.rollout.desired == before                     # no worker rolled
        told = link.told[-1]
        assert told.scheduling.policy == "fifo" and told.tenants[0].name == "team"
    run(main())
