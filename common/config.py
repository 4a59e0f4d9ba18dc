"""The one typed, frozen configuration tree of llmctl.

``load(path)`` parses ``config.toml`` once; every process receives the resulting
``Config`` (the supervisor hands it to its children as JSON through ``to_json`` /
``from_json``, which run the same validation).  Nothing reads configuration from
globals.

``Config`` is the root: one field per section (``config_sections.py``: each key with
its type, range, default and doc) and the ``[[models]]`` entries.  msgspec validates
the whole tree in one place (``_build``), then the checks that span keys run; a
msgspec error becomes a ``ConfigError`` naming the file, the section and the key, and
what is allowed (``config_explain.py``).

The sections are msgspec Structs, not dataclasses: derive a changed copy with
``msgspec.structs.replace`` and list the keys with ``msgspec.structs.fields``.
"""
# No ``from __future__ import annotations`` here: with string annotations msgspec would
# evaluate them through typing.get_type_hints on the first decode, which costs every
# process several milliseconds more than evaluating them once at import.

import os
import socket
from functools import cache
from pathlib import Path
from typing import Any, Mapping

import msgspec

from llmctl.common.config_explain import ConfigError, explain, unknown_section
from llmctl.common.config_sections import (
    ClusterConfig, ControlConfig, GatewayConfig, GenerationConfig, GpuConfig, HostConfig,
    HttpConfig, ModelConfig, ModelEntry, NodeConfig, SchedulingConfig, SyntheticConfig,
    TenantEntry, WorkersConfig)
# The [gpu] vocabulary the VRAM estimator (control/) reads through this module.
from llmctl.common.config_sections import (  # noqa: F401
    DEFAULT_BUDGET_MB, DEFAULT_CUDA_OVERHEAD_MB, KV_TYPES, ON_BREACH)

DEFAULT_CONFIG_NAME = "config.toml"
CONFIG_ENV = "LLMCTL_CONFIG"

# Keys of [model] / [workers] that a [[models]] entry sets for itself: with [[models]]
# they may not be set in those sections too (which would win is not obvious).
PER_MODEL_KEYS = {"model": ("path", "n_ctx", "n_gpu_layers", "threads", "sha256",
                            "speculative", "spec_max_draft", "cache_type_k", "cache_type_v",
                            "flash_attn"),
                  "workers": ("count", "slots")}


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
    scheduling: SchedulingConfig = SchedulingConfig()
    models: tuple[ModelEntry, ...] = ()     # [[models]]; () = the one [model]
    tenants: tuple[TenantEntry, ...] = ()   # [[tenants]]
    source: str = ""  # the file it came from ("" = defaults)

    # ---- derived, absolute paths -------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.control.run_dir)

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
        entry's, and ``models`` is that entry (the worker's name for itself), then its
        draft model's name, file and ``n_gpu_layers`` when it has one.  The
        gateway's own sections (``[scheduling]``, ``[[tenants]]``) are left out: a reload
        that changes only them rolls no worker."""
        replace = msgspec.structs.replace
        d = self.entry(e.draft) if e.draft else None     # what the worker loads of it
        models = (e,) if d is None else (e, ModelEntry(name=d.name, path=d.path,
                                                       n_gpu_layers=d.n_gpu_layers))
        return replace(self, models=models, scheduling=SchedulingConfig(), tenants=(),
                       model=replace(self.model, path=e.path, n_ctx=e.n_ctx,
                                     n_gpu_layers=e.n_gpu_layers, threads=e.threads,
                                     speculative=e.speculative,
                                     spec_max_draft=e.spec_max_draft,
                                     cache_type_k=e.cache_type_k, cache_type_v=e.cache_type_v,
                                     flash_attn=e.flash_attn),
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
                       slots=w.slots, threads=m.threads, cache_type_k=m.cache_type_k,
                       cache_type_v=m.cache_type_v, flash_attn=m.flash_attn, load="always",
                       keep_alive_s=0.0, speculative=m.speculative,
                       spec_max_draft=m.spec_max_draft),)


def _build(raw: Mapping[str, Any], source: str, base: Path | None) -> Config:
    """The one place a tree is decoded: msgspec validates, then the cross checks."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a table at the top level")
    if "source" in raw:                                 # a field of Config, not a section
        raise unknown_section(source, "source", Config)
    try:
        cfg = msgspec.convert({**raw, "source": source}, Config)
    except msgspec.ValidationError as exc:
        raise explain(exc, raw, source, Config) from None
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
    _check_cache_types(cfg)
    _check_drafts(cfg)
    for array, entries in (("models", cfg.models), ("tenants", cfg.tenants)):
        seen: dict[str, int] = {}
        for i, e in enumerate(entries, 1):
            if e.name in seen:
                raise ConfigError(f"{src}: [[{array}]] entry {i} ({e.name!r}): duplicate "
                                  f"name (entry {seen[e.name]} has it too)")
            seen[e.name] = i
    owner: dict[str, str] = {}
    for t in cfg.tenants:
        for key in t.keys:
            if not key or (key.startswith("sha256:") and len(key) != 71):
                raise ConfigError(f"{src}: [[tenants]] {t.name!r}: a key is empty or not "
                                  "sha256: and 64 hex digits")
            if key in owner:
                raise ConfigError(f"{src}: [[tenants]] {t.name!r}: a key of "
                                  f"{owner[key]!r} too")
            owner[key] = t.name


def _check_cache_types(cfg: Config) -> None:
    """llama.cpp's own rule (src/llama-context.cpp, llama_init_from_model): a quantized V
    cache needs flash attention, so with flash_attn = "off" it refuses to create the context."""
    where = [(f"[[models]] entry {i} ({e.name!r})", e) for i, e in enumerate(cfg.models, 1)] \
        or [("[model]", cfg.model)]
    for name, e in where:
        if KV_TYPES[e.cache_type_v][0] > 1 and e.flash_attn == "off":
            raise ConfigError(
                f"{cfg.source}: {name} cache_type_v = {e.cache_type_v!r} with flash_attn = "
                "'off': llama.cpp needs flash attention for a quantized V cache; set "
                "flash_attn = 'auto' or 'on', or cache_type_v = 'f16'")


def _check_drafts(cfg: Config) -> None:
    """``speculative = "draft"`` and ``draft`` go together, and ``draft`` names another entry."""
    if cfg.model.speculative == "draft" and not cfg.models:
        raise ConfigError(f"{cfg.source}: [model] speculative = 'draft': a draft model is "
                          "another [[models]] entry; serve both as [[models]] and set draft")
    names = {e.name for e in cfg.models}
    for i, e in enumerate(cfg.models, 1):
        where = f"{cfg.source}: [[models]] entry {i} ({e.name!r})"
        if e.speculative == "draft" and not e.draft:
            raise ConfigError(f"{where}: speculative = 'draft' needs draft = the name of "
                              "another [[models]] entry")
        if e.draft and e.speculative != "draft":
            raise ConfigError(f"{where}: draft = {e.draft!r} needs speculative = 'draft' "
                              f"(it is {e.speculative!r})")
        if e.draft == e.name:
            raise ConfigError(f"{where}: draft = {e.draft!r} names the entry itself: a draft "
                              "is another, smaller model")
        if e.draft and e.draft not in names:
            raise ConfigError(f"{where}: draft = {e.draft!r} names no [[models]] entry "
                              f"(there are {', '.join(repr(n) for n in sorted(names))})")


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
                   scheduling=replace(cfg.scheduling,
                                      keys_file=maybe(cfg.scheduling.keys_file)),
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

