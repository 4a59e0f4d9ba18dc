"""The supervisor as state: the transition tables of what it manages and the messages
it reads."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llmctl.common import admin, config
from llmctl.control.child import ChildProcess
from llmctl.control.states import LEGAL, ModelState, ProcessState, RolloutPhase, is_legal, move

KINDS = [ProcessState, ModelState, RolloutPhase]


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


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(f'[control]\nrun_dir = "run"\n{text}')
    return p


def test_a_link_report_keeps_its_wire_form():
    raw = b'{"kind":"worker_link","worker":"gpu1/w0.1","pid":7,"state":"joined",' \
          b'"detail":"","id":0}'
    report = admin.LinkReport(worker="gpu1/w0.1", pid=7, state="joined")
    assert admin.encode(report) == raw and admin.decode_link_report(raw) == report
    with pytest.raises(admin.AdminError, match="not a worker link report"):
        admin.decode_link_report(b'{"kind":"worker_link","worker":"w","pid":1,"state":"x"}')
