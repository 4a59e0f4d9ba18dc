"""The one typed, frozen configuration tree of llmctl.

``load(path)`` parses ``config.toml`` once; every process receives the resulting
``Config`` (the supervisor hands it to its children as JSON through ``to_json`` /
``from_json``, which run the same validation).  Nothing reads configuration from
globals.

Every section is a frozen ``msgspec.Struct`` that forbids unknown fields; every key is
typed with its allowed range (``Annotated[int, Meta(ge=..., le=...)]``) or its choices
(``Literal``), and documented by its ``Meta(description=...)``.  msgspec validates the
whole tree in one place (``_build``); its errors are rewritten into ``ConfigError``
messages naming the file, the section and the key, and what is allowed.

The sections are msgspec Structs, not dataclasses: derive a changed copy with
``msgspec.structs.replace`` and list the keys with ``msgspec.structs.fields``.
"""
# No ``from __future__ import annotations`` here: with string annotations msgspec would
# evaluate them through typing.get_type_hints on the first decode, which costs every
# process several milliseconds more than evaluating them once at import.

import os
import socket
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin

import msgspec
from msgspec import Meta

DEFAULT_CONFIG_NAME = "config.toml"
CONFIG_ENV = "LLMCTL_CONFIG"


# The [gpu] section's vocabulary, shared with the estimator (control/gpu_estimate.py).
DEFAULT_BUDGET_MB = 1024
DEFAULT_CUDA_OVERHEAD_MB = 150     # see docs/gpu.md: calibrate on the real card
KvType = Literal["f16", "q8_0", "f32"]
KV_TYPES = {"f16": (1, 2), "q8_0": (32, 34), "f32": (1, 4)}   # (values per block, bytes per block)
OnBreach = Literal["alert", "restart_largest"]
ON_BREACH: tuple[str, ...] = get_args(OnBreach)


class ConfigError(ValueError):
    """A configuration file is unreadable or one of its values is invalid."""


LoadPolicy = Literal["always", "on_demand"]
# Keys of [model] / [workers] that a [[models]] entry sets for itself: with [[models]]
# they may not be set in those sections too (which would win is not obvious).
PER_MODEL_KEYS = {"model": ("path", "n_ctx", "n_gpu_layers", "threads", "sha256"),
                  "workers": ("count", "slots")}


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    path: Annotated[str, Meta(
        description="GGUF file; relative paths are relative to the config file")] \
        = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    n_ctx: Annotated[int, Meta(ge=64, le=1 << 20,
                               description="context length of every sequence (tokens)")] = 2048
    n_gpu_layers: Annotated[int, Meta(
        ge=-1, le=10_000, description="layers offloaded to the GPU; -1 = all, 0 = CPU")] = -1
    threads: Annotated[int, Meta(
        ge=0, le=256, description="CPU threads per worker; 0 = cores / workers")] = 0
    n_batch: Annotated[int, Meta(
        ge=1, le=8192,
        description="prefill chunk size (tokens); cancellation is checked between chunks. "
                    "On the CPU, 64 or more goes through ggml's tiled attention kernel: faster for long "
                    "prompts, but a prompt-cache hit is then no longer bit-identical to a miss")] = 63
    sha256: Annotated[str, Meta(
        description="expected sha256 of the GGUF; empty = not checked at start")] = ""
    engine: Annotated[Literal["llama", "synthetic"], Meta(
        description="llama = the GGUF through llama.cpp; synthetic = no model: tokens at "
                    "[synthetic]'s pace, for benchmarks and tests of the data plane")] = "llama"


class WorkersConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    count: Annotated[int, Meta(ge=1, le=64, description="number of worker processes")] = 1
    slots: Annotated[int, Meta(
        ge=1, le=64,
        description="concurrent sequences per worker (= its dispatch credits), batched on one model copy")] = 1
    prompt_cache: Annotated[bool, Meta(
        description="a free slot keeps the KV of its last sequence; a request sharing its prefix reuses it")] \
        = True
    prompt_cache_mib: Annotated[int, Meta(
        ge=0, le=1 << 20,
        description="host memory per worker for KV states saved when a slot is reused (second cache level); "
                    "0 = none")] = 256
    embeddings: Annotated[bool, Meta(
        description="each worker also loads an embedding context on its model (mean pooling, "
                    "normalised) and serves POST /v1/embeddings; costs a second KV cache of "
                    "n_ctx cells")] = False
    heartbeat_interval_s: Annotated[float, Meta(
        ge=0.05, le=60.0, description="heartbeat period, both ways")] = 1.0
    liveness: Annotated[int, Meta(
        ge=1, le=100, description="missed heartbeat intervals before a worker is declared dead")] = 5
    ready_timeout_s: Annotated[float, Meta(
        ge=1.0, le=3600.0, description="time a worker may take to load and send READY")] = 120.0
    probe_interval_s: Annotated[float, Meta(
        ge=0.0, le=86_400.0,
        description="an idle worker gets a deep probe (1-token generation) this often; 0 = never")] = 30.0
    probe_timeout_s: Annotated[float, Meta(
        ge=0.1, le=3600.0, description="a deep probe that takes longer fails the worker")] = 10.0


class GenerationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_tokens: Annotated[int, Meta(
        ge=1, le=1 << 20, description="default max_tokens of a GENERATE")] = 128
    temperature: Annotated[float, Meta(
        ge=0.0, le=10.0, description="default sampling temperature (0 = greedy)")] = 0.7
    top_p: Annotated[float, Meta(
        ge=0.0, le=1.0, description="default nucleus sampling threshold")] = 0.95
    top_k: Annotated[int, Meta(ge=0, le=100_000, description="default top-k (0 = disabled)")] = 40
    deadline_ms: Annotated[int, Meta(
        ge=1, le=86_400_000, description="default deadline of a request, queue time included")] = 60_000
    max_deadline_ms: Annotated[int, Meta(
        ge=1, le=86_400_000, description="largest deadline_ms a client may ask for")] = 600_000


class GatewayConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: Annotated[str, Meta(description="TCP address of the binary protocol")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="TCP port of the binary protocol")] = 8080
    max_queue: Annotated[int, Meta(
        ge=0, le=1_000_000,
        description="requests that may wait for a worker credit; more are 'overloaded'")] = 64
    max_streams: Annotated[int, Meta(ge=1, le=10_000, description="open streams per connection")] = 16
    max_frame: Annotated[int, Meta(
        ge=64, le=1 << 30, description="largest frame accepted (bytes after the length field)")] = 1 << 20
    handshake_timeout_s: Annotated[float, Meta(
        ge=0.1, le=3600.0, description="time a client has to send HELLO")] = 5.0
    token: Annotated[str, Meta(description="if set, clients must send it in HELLO")] = ""
    write_buffer_bytes: Annotated[int, Meta(
        ge=1024, le=1 << 30,
        description="per-connection write buffer (user space high-water mark and kernel SO_SNDBUF)")] \
        = 256 * 1024
    slow_client_timeout_s: Annotated[float, Meta(
        ge=0.1, le=86_400.0,
        description="a stream whose client takes no output this long (its token window "
                    "spent) is cancelled with ERROR slow_client and its slot freed")] = 30.0
    park_after_s: Annotated[float, Meta(
        ge=0.0, le=86_400.0,
        description="a stream whose client takes no output this long is parked: its worker "
                    "frees the slot for others and resumes it when the client reads; 0 = never")] = 1.0
    token_window: Annotated[int, Meta(
        ge=1, le=100_000,
        description="TOKEN messages a worker may send ahead of what a stream's client has taken")] = 16
    uvloop: Annotated[bool, Meta(
        description="serve on uvloop's event loop when it is installed (faster sockets); "
                    "false = asyncio's own")] = True


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: Annotated[bool, Meta(description="serve the OpenAI-compatible HTTP front")] = False
    host: Annotated[str, Meta(description="HTTP address")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="HTTP port")] = 8081
    api_key: Annotated[str, Meta(
        description="if set, /v1 routes require `Authorization: Bearer KEY`; "
                    "env LLMCTL_API_KEY, when set and non-empty, overrides it")] = ""
    body_timeout_s: Annotated[float, Meta(
        ge=0.1, le=3600.0,
        description="time a client has to send a request body; slower is 408")] = 10.0


class ControlConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    run_dir: Annotated[str, Meta(
        description="pidfile, control socket and logs; relative to the config file")] = ".llmctl"
    start_timeout_s: Annotated[float, Meta(
        ge=1.0, le=3600.0, description="`llmctl start` waits this long for READY")] = 180.0
    drain_timeout_s: Annotated[float, Meta(
        ge=0.0, le=3600.0, description="time in-flight requests get to finish on stop")] = 30.0
    stop_timeout_s: Annotated[float, Meta(
        ge=0.1, le=600.0, description="SIGTERM to SIGKILL grace per process")] = 5.0
    backoff_initial_s: Annotated[float, Meta(
        ge=0.0, le=600.0, description="first restart delay of a crashed process")] = 0.5
    backoff_max_s: Annotated[float, Meta(ge=0.0, le=3600.0, description="largest restart delay")] = 30.0
    stable_after_s: Annotated[float, Meta(
        ge=0.0, le=86_400.0,
        description="uptime after which a death no longer counts towards the backoff")] = 20.0
    max_restarts: Annotated[int, Meta(
        ge=1, le=1000, description="crashes within restart_window_s that make a worker FATAL")] = 5
    restart_window_s: Annotated[float, Meta(
        ge=1.0, le=86_400.0, description="window of the flapping guard")] = 120.0
    log_max_bytes: Annotated[int, Meta(
        ge=1024, le=1 << 40, description="size at which a log file rotates")] = 10 * 1024 * 1024
    log_backups: Annotated[int, Meta(ge=0, le=100, description="rotated log files kept")] = 3


class GpuConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    vram_budget_mb: Annotated[int, Meta(
        ge=1, le=1 << 24,
        description="VRAM all workers together may use (MiB, as nvidia-smi counts)")] = DEFAULT_BUDGET_MB
    fit: Annotated[bool, Meta(
        description="shrink workers.count, then model.n_ctx, then model.n_gpu_layers "
                    "until the estimate fits, instead of refusing to start")] = False
    kv_type: Annotated[KvType, Meta(
        description="KV cache element type the estimate assumes")] = "f16"
    compute_buffer_mb: Annotated[int, Meta(
        ge=-1, le=1 << 20,
        description="llama.cpp compute buffer per worker (MiB); -1 = derive from "
                    "the model: n_ubatch x (n_vocab + n_ctx x n_head) x 4 B")] = -1
    cuda_overhead_mb: Annotated[int, Meta(
        ge=0, le=1 << 20,
        description="CUDA context + cuBLAS per worker process (MiB); calibrate "
                    "on the card (docs/gpu.md)")] = DEFAULT_CUDA_OVERHEAD_MB
    on_breach: Annotated[OnBreach, Meta(
        description="measured use above the budget: alert = log it; restart_largest = "
                    "also restart the largest worker with fewer GPU layers")] = "alert"
    sample_interval_s: Annotated[float, Meta(
        ge=0.1, le=3600.0, description="how often the supervisor reads VRAM use")] = 2.0


class SyntheticConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    step_ms: Annotated[float, Meta(
        ge=0.0, le=10_000.0,
        description="time one engine step takes: a token for every decoding sequence "
                    "(1.0 = 1,000 tokens/s per sequence, a GPU's pace)")] = 1.0
    prefill_tokens_per_ms: Annotated[float, Meta(
        ge=0.001, le=1e6, description="prompt evaluation speed (a prompt is about 4 bytes a token)")] \
        = 50.0
    piece: Annotated[str, Meta(description="the text of every generated token")] = " tok"
    stamp: Annotated[bool, Meta(
        description="each token's text is the monotonic time (ns) it was made, for the load "
                    "generator's added-latency measurement (`llmctl bench --stamped`)")] = False


class ClusterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bind: Annotated[str, Meta(
        description="the head's ZeroMQ endpoint for workers of other machines "
                    "(e.g. tcp://0.0.0.0:5555); empty = local workers only")] = ""
    secret_key: Annotated[str, Meta(
        description="the head's CURVE keypair (a .key_secret file of `llmctl keys generate`, "
                    "mode 0600); relative to the config file")] = ""
    authorized_keys: Annotated[str, Meta(
        description="directory of the nodes' public keys (*.key files) the head admits; "
                    "read at each handshake, so adding or removing a file needs no restart")] = ""
    allow_insecure: Annotated[bool, Meta(
        description="bind without CURVE (no encryption, no authentication); allowed only "
                    "on a loopback address, for tests")] = False


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    join: Annotated[str, Meta(
        description="the head's [cluster] bind as this machine reaches it "
                    "(e.g. tcp://head:5555); set = this machine is a node: its workers "
                    "serve the head's gateway, no gateway runs here")] = ""
    name: Annotated[str, Meta(
        description="this machine's name in status, top and /metrics (unique in the "
                    "cluster); empty = the host name")] = ""
    secret_key: Annotated[str, Meta(
        description="this node's CURVE keypair (a .key_secret file, mode 0600); "
                    "its .key must be in the head's authorized_keys")] = ""
    head_key: Annotated[str, Meta(
        description="the head's public key (.key file): the only server this node talks to")] = ""
    allow_insecure: Annotated[bool, Meta(
        description="join without CURVE; allowed only to a loopback address, for tests")] = False
    connect_timeout_s: Annotated[float, Meta(
        ge=0.1, le=600.0,
        description="a TCP connect to the head that takes longer is abandoned and tried "
                    "again (ZeroMQ reconnects by itself); above the link's worst round trip")] = 2.0


ThreadsPolicy = Literal["adaptive", "fixed"]


class HostConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    threads_policy: Annotated[ThreadsPolicy, Meta(
        description="adaptive = a worker computes with at most `threads` threads, fewer while "
                    "they wait for a CPU more than a quarter of the time (other processes "
                    "share the cores), one more again once a CPU is idle; fixed = always "
                    "`threads` (a host whose cores are the service's alone)")] = "adaptive"
    ram_budget_mb: Annotated[int, Meta(
        ge=0, le=1 << 24,
        description="host memory the loaded models' workers may use on a CPU host (MiB, by "
                    "the same GGUF estimate as the VRAM plan, plus prompt_cache_mib); "
                    "0 = no budget")] = 0


class ModelEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One served model: a ``[[models]]`` entry, or the one ``[model]`` section."""
    name: Annotated[str, Meta(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="the model's name: the `model` of a request (OpenAI's and GENERATE's); "
                    "the first entry is the default model")]
    path: Annotated[str, Meta(
        description="GGUF file; relative paths are relative to the config file")]
    n_ctx: Annotated[int, Meta(ge=64, le=1 << 20,
                               description="context length of every sequence (tokens)")] = 2048
    n_gpu_layers: Annotated[int, Meta(
        ge=-1, le=10_000, description="layers offloaded to the GPU; -1 = all, 0 = CPU")] = -1
    workers: Annotated[int, Meta(ge=1, le=64, description="worker processes of this model")] = 1
    slots: Annotated[int, Meta(
        ge=1, le=64, description="concurrent sequences per worker (= its dispatch credits)")] = 1
    threads: Annotated[int, Meta(
        ge=0, le=256, description="CPU threads per worker; 0 = cores / workers")] = 0
    load: Annotated[LoadPolicy, Meta(
        description="always = loaded at start and never evicted; on_demand = loaded by the "
                    "first request for it (or `llmctl load`), unloaded after keep_alive_s idle "
                    "or to make room for another")] = "always"
    keep_alive_s: Annotated[float, Meta(
        ge=0.0, le=86_400.0 * 365,
        description="an on_demand model idle this long (no request queued or running) "
                    "is unloaded; 0 = only to make room")] = 300.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: ModelConfig = ModelConfig()
    workers: WorkersConfig = WorkersConfig()
    generation: GenerationConfig = GenerationConfig()
    gateway: GatewayConfig = GatewayConfig()
    http: HttpConfig = HttpConfig()
    control: ControlConfig = ControlConfig()
    gpu: GpuConfig = GpuConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    cluster: ClusterConfig = ClusterConfig()
    node: NodeConfig = NodeConfig()
    host: HostConfig = HostConfig()
    models: tuple[ModelEntry, ...] = ()     # [[models]]; () = the one [model]
    source: str = ""  # the file it came from ("" = defaults)

    # ---- derived, absolute paths -------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.control.run_dir)

    @property
    def model_path(self) -> Path:
        return Path(self.model.path)

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'control.sock'}"

    @property
    def workers_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'workers.sock'}"

    @property
    def link_endpoint(self) -> str:
        """The supervisor <-> gateway link (the supervisor binds it)."""
        return f"ipc://{self.run_dir / 'link.sock'}"

    @property
    def is_node(self) -> bool:
        """This machine runs workers for a head elsewhere: no gateway here."""
        return bool(self.node.join)

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname()

    @property
    def worker_endpoint(self) -> str:
        """Where this machine's workers connect: the local gateway, or the head."""
        return self.node.join or self.workers_endpoint

    @property
    def node_endpoint(self) -> str:
        """A node's workers report their link state to their supervisor here."""
        return f"ipc://{self.run_dir / 'node.sock'}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisor.pid"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def served(self) -> tuple[ModelEntry, ...]:
        """The normalised list of served models: the ``[[models]]`` entries, or the one
        ``[model]`` (named after its file); the first is the default model."""
        return served_models(self)

    @property
    def default_model(self) -> ModelEntry:
        return self.served[0]

    def entry(self, name: str | None) -> ModelEntry | None:
        """The served model called ``name`` (None/"" = the default), or None."""
        if not name:
            return self.served[0]
        return next((e for e in self.served if e.name == name), None)

    def for_model(self, e: ModelEntry) -> "Config":
        """The config one worker of model ``e`` runs: its [model] and [workers] are the
        entry's, and ``models`` is that one entry (the worker's name for itself)."""
        replace = msgspec.structs.replace
        return replace(self, models=(e,),
                       model=replace(self.model, path=e.path, n_ctx=e.n_ctx,
                                     n_gpu_layers=e.n_gpu_layers, threads=e.threads),
                       workers=replace(self.workers, count=e.workers, slots=e.slots))

    def worker_threads(self) -> int:
        if self.model.threads:
            return self.model.threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers.count)

    def to_json(self) -> str:
        # indent=0: one line, spaced like json.dumps ('"count": 3').
        return msgspec.json.format(msgspec.json.encode(self), indent=0).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> "Config":
        try:
            raw = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"<json>: invalid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("<json>: expected a table at the top level")
        source = raw.pop("source", "")
        return _build(raw, source if source and isinstance(source, str) else "<json>", base=None)


@cache
def served_models(cfg: Config) -> tuple[ModelEntry, ...]:
    """``cfg.served``, derived once per config (a frozen tree: hashable)."""
    if cfg.models:
        return cfg.models
    m, w = cfg.model, cfg.workers
    return (ModelEntry(name=Path(m.path).name.removesuffix(".gguf") or "model", path=m.path,
                       n_ctx=m.n_ctx, n_gpu_layers=m.n_gpu_layers, workers=w.count,
                       slots=w.slots, threads=m.threads, load="always", keep_alive_s=0.0),)


# ---- validation -------------------------------------------------------------------

class _Key(msgspec.Struct, frozen=True):
    """What one key allows, read from its annotation: the messages and the reference."""
    kind: type                      # bool, int, float or str
    lo: float | None
    hi: float | None
    choices: tuple[str, ...] | None
    default: Any
    doc: str
    pattern: str | None = None


def _struct_keys(name: str, struct: type) -> dict[str, _Key]:
    keys = {}
    for f in msgspec.structs.fields(struct):
        base, *extras = get_args(f.type) if get_origin(f.type) is Annotated else (f.type,)
        meta = next((m for m in extras if isinstance(m, Meta)), Meta())
        choices = get_args(base) if get_origin(base) is Literal else None
        kind = str if choices else base
        if kind not in (bool, int, float, str) or meta.gt is not None or meta.lt is not None \
                or choices and not all(isinstance(c, str) for c in choices):
            raise TypeError(f"[{name}] {f.name}: unsupported config type {f.type}")
        keys[f.name] = _Key(kind, meta.ge, meta.le, choices, f.default, meta.description or "",
                            meta.pattern)
    return keys


@cache
def _keys() -> dict[str, dict[str, _Key]]:
    """section -> key -> _Key, in declaration order (built on first use, not at import)."""
    sections: dict[str, dict[str, _Key]] = {}
    for sec in msgspec.structs.fields(Config):
        if not (isinstance(sec.type, type) and issubclass(sec.type, msgspec.Struct)):
            continue                                    # models, source
        sections[sec.name] = _struct_keys(sec.name, sec.type)
    return sections


@cache
def _entry_keys() -> dict[str, _Key]:
    """The keys of a [[models]] entry."""
    return _struct_keys("[models]", ModelEntry)


def _check_value(where: str, key: _Key, value: Any) -> None:
    """Raise the ConfigError for ``value`` if ``key`` does not allow it."""
    if key.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif key.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif key.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            pass                                        # a huge int: out of range below
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    lo, hi = key.lo, key.hi
    if lo is not None and not value >= lo or hi is not None and not value <= hi:   # nan too
        raise ConfigError(f"{where}: {value!r} is out of range [{lo}, {hi}]")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(key.choices)}")
    if key.pattern and not re.match(key.pattern, value):
        raise ConfigError(f"{where}: {value!r} is not a valid name (letters, digits and "
                          "._:/- ; it starts with a letter or digit)")


def _explain(exc: msgspec.ValidationError, raw: Mapping[str, Any], source: str) -> ConfigError:
    """msgspec's error (``... - at `$.model.n_ctx```) as a ConfigError naming section and key.

    Only the path is taken from msgspec; the message is written from the key's
    annotation and the raw value, as ``_check_value`` words it.
    """
    text, sep, path = str(exc).rpartition(" - at `")
    if not sep:
        text, path = str(exc), "$"
    parts = path.rstrip("`").split(".")[1:]
    keys = _keys()
    if parts and parts[0].startswith("models"):
        return _explain_entry(text, parts, raw, source)
    if not parts:
        for name in raw:
            if name not in keys:
                return ConfigError(f"{source}: unknown section [{name}] "
                                   f"(known: {', '.join(keys)}, [[models]])")
    elif parts[0] in keys and parts[0] in raw:
        name, table = parts[0], raw[parts[0]]
        if not isinstance(table, Mapping):
            return ConfigError(f"{source}: [{name}] must be a table")
        known = keys[name]
        if len(parts) == 1:
            for key in table:
                if key not in known:
                    return ConfigError(f"{source}: unknown key [{name}] {key} "
                                       f"(known: {', '.join(known)})")
        elif len(parts) == 2 and parts[1] in known and parts[1] in table:
            try:
                _check_value(f"{source}: [{name}] {parts[1]}", known[parts[1]], table[parts[1]])
            except ConfigError as err:
                return err
        where = f"[{name}]" if len(parts) == 1 else f"[{name}] {'.'.join(parts[1:])}"
        return ConfigError(f"{source}: {where}: {text}")
    return ConfigError(f"{source}: {text}")


def _explain_entry(text: str, parts: list[str], raw: Mapping[str, Any],
                   source: str) -> ConfigError:
    """An error inside ``[[models]]``: name the entry (number and name) and the key."""
    entries = raw.get("models")
    head, _, idx = parts[0].partition("[")
    if head != "models" or not isinstance(entries, list):
        return ConfigError(f"{source}: [[models]] must be an array of tables "
                           "([[models]] entries)")
    if not idx:
        return ConfigError(f"{source}: [[models]]: {text}")
    i = int(idx.rstrip("]"))
    entry = entries[i] if i < len(entries) else None
    if not isinstance(entry, Mapping):
        return ConfigError(f"{source}: [[models]] entry {i + 1} must be a table")
    name = entry.get("name")
    where = f"{source}: [[models]] entry {i + 1}" + (f" ({name!r})" if isinstance(name, str)
                                                     else "")
    known = _entry_keys()
    for key in entry:
        if key not in known:
            return ConfigError(f"{where}: unknown key {key} (known: {', '.join(known)})")
    if len(parts) == 1:
        missing = [k for k in ("name", "path") if k not in entry]
        if missing:
            return ConfigError(f"{where}: {missing[0]} is required")
        return ConfigError(f"{where}: {text}")
    key = parts[1]
    if key in known and key in entry:
        try:
            _check_value(f"{where} {key}", known[key], entry[key])
        except ConfigError as err:
            return err
    return ConfigError(f"{where} {key}: {text}")


def _build(raw: Mapping[str, Any], source: str, base: Path | None) -> Config:
    """The one place a tree is decoded: msgspec validates, then the cross checks."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a table at the top level")
    if "source" in raw:                                 # a field of Config, not a section
        raise ConfigError(f"{source}: unknown section [source] "
                          f"(known: {', '.join(_keys())}, [[models]])")
    try:
        cfg = msgspec.convert({**raw, "source": source}, Config)
    except msgspec.ValidationError as exc:
        raise _explain(exc, raw, source) from None
    _cross_checks(cfg)
    if cfg.models and base is not None:     # a file: [model]/[workers] may not say it too
        for section, names in PER_MODEL_KEYS.items():
            table = raw.get(section)
            for key in names if isinstance(table, Mapping) else ():
                if key in table:
                    raise ConfigError(
                        f"{source}: [{section}] {key} is set per model when [[models]] is "
                        f"given: set it in each [[models]] entry instead")
    if base is not None:
        cfg = _resolve_paths(cfg, base)
    return cfg


def _cross_checks(cfg: Config) -> None:
    src = cfg.source
    g = cfg.generation
    if g.deadline_ms > g.max_deadline_ms:
        raise ConfigError(f"{src}: [generation] deadline_ms ({g.deadline_ms}) exceeds "
                          f"max_deadline_ms ({g.max_deadline_ms})")
    c = cfg.control
    if c.backoff_initial_s > c.backoff_max_s:
        raise ConfigError(f"{src}: [control] backoff_initial_s exceeds backoff_max_s")
    if cfg.http.enabled and cfg.http.port == cfg.gateway.port and cfg.http.port != 0 \
            and cfg.http.host == cfg.gateway.host:
        raise ConfigError(f"{src}: [http] port {cfg.http.port} is also [gateway] port")
    _check_cluster(cfg)
    seen: dict[str, int] = {}
    for i, e in enumerate(cfg.models, 1):
        if e.name in seen:
            raise ConfigError(f"{src}: [[models]] entry {i} ({e.name!r}): duplicate name "
                              f"(entry {seen[e.name]} has it too)")
        seen[e.name] = i


LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _tcp_host(where: str, endpoint: str) -> str:
    """The host of a tcp://HOST:PORT endpoint, or a ConfigError."""
    rest = endpoint.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if not endpoint.startswith("tcp://") or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {endpoint!r} is not tcp://HOST:PORT")
    return host


def _check_cluster(cfg: Config) -> None:
    """CURVE or an explicit, loopback-only allow_insecure; a machine is a head or a node."""
    src, c, n = cfg.source, cfg.cluster, cfg.node
    if c.bind:
        host = _tcp_host(f"{src}: [cluster] bind", c.bind)
        if c.allow_insecure:
            if not _is_loopback(host):
                raise ConfigError(f"{src}: [cluster] allow_insecure: {c.bind} is not a loopback "
                                  "address; across machines set secret_key and authorized_keys")
        elif not (c.secret_key and c.authorized_keys):
            raise ConfigError(f"{src}: [cluster] bind {c.bind} without CURVE is refused: set "
                              "secret_key and authorized_keys (`llmctl keys generate`)")
    if n.join:
        if c.bind:
            raise ConfigError(f"{src}: [node] join and [cluster] bind: a machine is a node or "
                              "a head, not both")
        host = _tcp_host(f"{src}: [node] join", n.join)
        if n.allow_insecure:
            if not _is_loopback(host):
                raise ConfigError(f"{src}: [node] allow_insecure: {n.join} is not a loopback "
                                  "address; set secret_key and head_key")
        elif not (n.secret_key and n.head_key):
            raise ConfigError(f"{src}: [node] join {n.join} without CURVE is refused: set "
                              "secret_key and head_key (`llmctl keys generate`)")
    if "/" in n.name or any(ch.isspace() for ch in n.name):
        raise ConfigError(f"{src}: [node] name {n.name!r}: no '/' or spaces")


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def absolute(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    replace = msgspec.structs.replace
    def maybe(p: str) -> str:
        return absolute(p) if p else p

    c, n = cfg.cluster, cfg.node
    return replace(cfg, model=replace(cfg.model, path=absolute(cfg.model.path)),
                   models=tuple(replace(e, path=absolute(e.path)) for e in cfg.models),
                   control=replace(cfg.control, run_dir=absolute(cfg.control.run_dir)),
                   cluster=replace(c, secret_key=maybe(c.secret_key),
                                   authorized_keys=maybe(c.authorized_keys)),
                   node=replace(n, secret_key=maybe(n.secret_key), head_key=maybe(n.head_key)))


def default_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def load(path: str | os.PathLike[str]) -> Config:
    """Parse and validate a config file.  Raises ConfigError naming the key."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    try:
        raw = msgspec.toml.decode(data)                 # imports tomllib only here
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return _build(raw, str(p), base=p.resolve().parent)


def reference() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: the README's config reference
    (``[[models]]`` for the keys of a models entry; a required key's default is None)."""
    out = [(name, key, k.default, k.doc)
           for name, keys in _keys().items() for key, k in keys.items()]
    out += [("[models]", key, None if k.default is msgspec.NODEFAULT else k.default, k.doc)
            for key, k in _entry_keys().items()]
    return out
