"""The states of what the supervisor manages, their legal transitions, and the one
function that changes a state.

Each kind has a string enum (its values are what ``llmctl status --json`` prints) and a
table of the transitions it may make, in the manner of llama-swap's ``ProcessState``
and ``isValidTransition``:

* ``ProcessState``: a supervised process (``child.py``).  A worker is ``starting`` until
  its READY reaches the gateway, then ``running``; the gateway is ``running`` from its
  spawn.  A death puts it in ``backoff`` (restarted when the delay is over) or ``fatal``
  (``llmctl restart`` puts it back in ``backoff``); ``stopped`` is where it starts and ends.
* ``ModelState``: a served model (``models.py``): ``unloaded``, ``loading``, ``loaded``,
  ``unloading``, in that cycle; a load that fails goes from ``loading`` to ``unloading``.
* ``RolloutPhase``: the replacement of one worker (``rollout.py``): ``starting`` the new
  process, ``draining`` the old one, ``stopping`` it; in place, the new one starts
  after the old one stopped.
* ``ReloadState``: ``llmctl reload`` (``reload.py``): ``idle`` until the first one, then
  ``rolling`` until ``done`` or ``failed``.

``move`` is the one way a state changes.  A transition the table does not list is a bug
of the supervisor: it is logged as an error naming the object and both states, with the
stack that made it.  It still applies: a state records what happened to a real process
or was decided about it, and the reconcile loop acts on that record; a record that
refused to follow would make it act on something that is no longer so.
"""
from __future__ import annotations

import logging
from enum import StrEnum
from typing import TypeVar

log = logging.getLogger(__name__)


class ProcessState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    FATAL = "fatal"


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class RolloutPhase(StrEnum):
    STARTING = "starting"
    DRAINING = "draining"
    STOPPING = "stopping"


class ReloadState(StrEnum):
    IDLE = "idle"
    ROLLING = "rolling"
    DONE = "done"
    FAILED = "failed"


_P, _M, _R, _L = ProcessState, ModelState, RolloutPhase, ReloadState

# Each kind's table: state -> the states it may move to.  A stop is legal from anywhere,
# a second stop included (shutdown stops what a rollout may be stopping already).
LEGAL: dict[type[StrEnum], dict[StrEnum, frozenset[StrEnum]]] = {
    ProcessState: {
        _P.STOPPED: frozenset({_P.STARTING, _P.RUNNING, _P.STOPPED}),
        _P.STARTING: frozenset({_P.RUNNING, _P.BACKOFF, _P.FATAL, _P.STOPPED}),
        _P.RUNNING: frozenset({_P.BACKOFF, _P.FATAL, _P.STOPPED}),
        _P.BACKOFF: frozenset({_P.STARTING, _P.RUNNING, _P.STOPPED}),
        _P.FATAL: frozenset({_P.BACKOFF, _P.STOPPED}),
    },
    ModelState: {
        _M.UNLOADED: frozenset({_M.LOADING}),
        _M.LOADING: frozenset({_M.LOADED, _M.UNLOADING}),
        _M.LOADED: frozenset({_M.UNLOADING}),
        _M.UNLOADING: frozenset({_M.UNLOADED}),
    },
    RolloutPhase: {
        _R.STARTING: frozenset({_R.DRAINING}),
        _R.DRAINING: frozenset({_R.STOPPING}),
        _R.STOPPING: frozenset({_R.STARTING}),
    },
    ReloadState: {
        _L.IDLE: frozenset({_L.ROLLING}),
        _L.ROLLING: frozenset({_L.DONE, _L.FAILED}),
        _L.DONE: frozenset({_L.ROLLING}),
        _L.FAILED: frozenset({_L.ROLLING}),
    },
}

S = TypeVar("S", bound=StrEnum)


def is_legal(old: StrEnum, new: StrEnum) -> bool:
    """Whether ``old`` may move to ``new`` (both of one kind)."""
    return type(old) is type(new) and new in LEGAL[type(old)][old]


def move(what: object, old: S, new: S) -> S:
    """The state of ``what`` after moving from ``old`` to ``new``: ``new``, logged as a
    bug (with the stack) when the table does not allow it."""
    if not is_legal(old, new):
        log.error("illegal state transition of %s: %s -> %s", what, old.value, new.value,
                  stack_info=True)
    return new
