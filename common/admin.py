"""The control plane's messages, typed: CLI -> supervisor, supervisor <-> gateway, a
node's workers -> their supervisor.

* The CLI sends a ``Command`` to the supervisor's control socket (REQ/REP,
  ``run_dir/control.sock``) and gets a JSON object back (``reply``).
* The supervisor and the gateway share one link (``run_dir/link.sock``): the supervisor
  binds a ROUTER, each gateway spawn connects a DEALER.  The supervisor sends ``Command``s
  (``Ping`` every heartbeat interval, the others when its desired state asks for them);
  the gateway answers each with a ``Reply`` carrying the command's ``id``, and pushes
  ``Event``s on its own: it is up, a worker is ready, lost or drained.
* On a node, each worker reports how its link to the head stands to its supervisor
  (``LinkReport``, ``run_dir/node.sock``, PUSH -> PULL).

Every message is a msgspec struct tagged by its kind and is decoded and validated once,
where it is received (``decode_command``, ``decode_from_gateway``, ``decode_link_report``);
a malformed one raises ``AdminError``, and the receiver logs and drops it (the gateway also
counts it; the supervisor's control socket answers it with the error).
"""
from __future__ import annotations

from typing import Any, Literal, Union

import msgspec

from llmctl.common.config import GenerationConfig, SchedulingConfig, TenantEntry


class AdminError(ValueError):
    """A control message that does not parse (a bug or a version mismatch)."""


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind",
           forbid_unknown_fields=False):
    id: int = 0            # commands: matched by their Reply; events: 0


# ---- commands ----------------------------------------------------------------------------

class Status(_Msg, tag="status"):
    """CLI: the whole status; supervisor -> gateway: the gateway's part of it."""


class Stop(_Msg, tag="stop"):
    """CLI: drain and stop everything."""


class Restart(_Msg, tag="restart"):
    """CLI: clear the failure history of FATAL workers (all when ``workers`` is empty)."""
    workers: list[str] = []


class Reload(_Msg, tag="reload"):
    """CLI: re-read the config file and converge to it."""


class Ping(_Msg, tag="ping"):
    """Supervisor -> gateway, every heartbeat interval: liveness of the gateway."""


class Drain(_Msg, tag="drain"):
    """Supervisor -> gateway: admit nothing new (a stop)."""


class DrainWorker(_Msg, tag="drain_worker"):
    """Supervisor -> gateway: give ``worker`` nothing new; say WorkerDrained when it is idle."""
    worker: str


class WorkerExited(_Msg, tag="worker_exited"):
    """Supervisor -> gateway: the process of ``worker`` is gone (forget it)."""
    worker: str
    why: str = "exited"


class Procs(_Msg, tag="procs"):
    """Supervisor -> gateway: process figures (states, RSS, CPU, VRAM) for /metrics."""
    procs: dict[str, Any]


class Reconfigure(_Msg, tag="reconfigure"):
    """Supervisor -> gateway: what a reload changes without a restart: the generation
    defaults, the scheduling policy, the tenants (streams that run go on)."""
    generation: GenerationConfig
    scheduling: SchedulingConfig
    tenants: tuple[TenantEntry, ...] = ()


class Models(_Msg, tag="models"):
    """CLI: every served model and its state; supervisor -> gateway: each model's queue,
    requests and idle time (what eviction and keep_alive_s decide on)."""


class Load(_Msg, tag="load"):
    """CLI: load ``model`` now (an on-demand model; evicting the LRU idle one if needed)."""
    model: str


class Unload(_Msg, tag="unload"):
    """CLI: drain and unload ``model`` (it loads again on its next request if on demand)."""
    model: str


class ModelUnavailable(_Msg, tag="model_unavailable"):
    """Supervisor -> gateway: ``model`` cannot be loaded now; its queued requests are
    answered with this error (``overloaded`` with ``retry_after_ms``, or ``not_ready``)."""
    model: str
    code: str
    message: str
    retry_after_ms: int | None = None


Command = Union[Status, Stop, Restart, Reload, Ping, Drain, DrainWorker, WorkerExited, Procs,
                Reconfigure, Models, Load, Unload, ModelUnavailable]


# ---- gateway -> supervisor ---------------------------------------------------------------

class Reply(_Msg, tag="reply"):
    ok: bool = True
    error: str | None = None
    data: dict[str, Any] = {}


class GatewayUp(_Msg, tag="gateway_up"):
    """The gateway listens (it is ready); its addresses."""
    pid: int
    listening: list[str]
    http_listening: list[str] = []
    metrics_url: str = ""


class WorkerReady(_Msg, tag="worker_ready"):
    """A worker's READY reached the gateway: it serves."""
    worker: str
    pid: int
    slots: int


class WorkerLost(_Msg, tag="worker_lost"):
    """The gateway declared a worker dead (silent, unreachable, a failed deep probe); the
    supervisor kills the process if it still runs (hung) and restarts it."""
    worker: str
    pid: int
    why: str


class WorkerDrained(_Msg, tag="worker_drained"):
    """A worker told to drain holds no request any more."""
    worker: str


class ModelWanted(_Msg, tag="model_wanted"):
    """A request waits for ``model``, which has no ready worker: load it."""
    model: str


class ModelUnwanted(_Msg, tag="model_unwanted"):
    """A client asked to unload ``model`` (llama-server's ``POST /models/unload``)."""
    model: str


FromGateway = Union[Reply, GatewayUp, WorkerReady, WorkerLost, WorkerDrained, ModelWanted,
                    ModelUnwanted]

# ---- node worker -> its supervisor ---------------------------------------------------------

LinkState = Literal["connecting", "joined", "lost", "refused", "drained"]


class LinkReport(_Msg, tag="worker_link"):
    """A node's worker tells its supervisor (``run_dir/node.sock``, PUSH -> PULL) how its
    link to the head stands: connecting (loaded, READY queued), joined (the head's gateway
    answers), lost (the head went silent: it reconnects), refused (the head refused this
    node's CURVE key or the handshake), drained (told to drain with SIGUSR1, it holds no
    request any more: it may be stopped)."""
    worker: str
    pid: int
    state: LinkState
    detail: str = ""


_encoder = msgspec.json.Encoder()
_link_report = msgspec.json.Decoder(LinkReport)
_commands = msgspec.json.Decoder(Command)
_from_gateway = msgspec.json.Decoder(FromGateway)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_command(raw: bytes) -> Command:
    try:
        return _commands.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AdminError(f"not a command: {exc}") from None


def decode_from_gateway(raw: bytes) -> FromGateway:
    try:
        return _from_gateway.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AdminError(f"not a gateway message: {exc}") from None


def decode_link_report(raw: bytes) -> LinkReport:
    try:
        return _link_report.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AdminError(f"not a worker link report: {exc}") from None


def reply_json(ok: bool, **data: Any) -> bytes:
    """A reply to the CLI: a JSON object with ``ok`` first."""
    return _encoder.encode({"ok": ok, **data})
