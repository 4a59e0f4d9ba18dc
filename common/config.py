"""The one typed, frozen configuration tree of llmctl.

``load(path)`` parses ``config.toml`` once; every process receives the resulting
``Config`` (the supervisor hands it to its children as JSON through ``to_json`` /
``from_json``, which run the same validation).  Nothing reads configuration from
globals.

Every section is a frozen dataclass; every field carries its allowed range in its
metadata.  Unknown sections or keys, wrong types and out-of-range values raise
``ConfigError`` naming the file, the section and the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dataclasses import field

DEFAULT_CONFIG_NAME = "config.toml"
CONFIG_ENV = "LLMCTL_CONFIG"


# The [gpu] section's vocabulary, shared with the estimator (control/gpu_estimate.py).
DEFAULT_BUDGET_MB = 1024
DEFAULT_CUDA_OVERHEAD_MB = 150     # see docs/gpu.md: calibrate on the real card
KV_TYPES = {"f16": (1, 2), "q8_0": (32, 34), "f32": (1, 4)}   # (values per block, bytes per block)
ON_BREACH = ("alert", "restart_largest")


def _f(default: Any, lo: float | None = None, hi: float | None = None,
       choices: tuple[str, ...] | None = None, doc: str = "") -> Any:
    """A dataclass field whose metadata this module checks and documents."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "doc": doc})


class ConfigError(ValueError):
    """A configuration file is unreadable or one of its values is invalid."""




@dataclass(frozen=True)
class ModelConfig:
    path: str = _f("models/SmolLM2-135M-Instruct.Q4_1.gguf",
                   doc="GGUF file; relative paths are relative to the config file")
    n_ctx: int = _f(2048, 64, 1 << 20, doc="context length of every sequence (tokens)")
    n_gpu_layers: int = _f(-1, -1, 10_000, doc="layers offloaded to the GPU; -1 = all, 0 = CPU")
    threads: int = _f(0, 0, 256, doc="CPU threads per worker; 0 = cores / workers")
    n_batch: int = _f(63, 1, 8192, doc="prefill chunk size (tokens); cancellation is checked between chunks. "
                      "On the CPU, 64 or more goes through ggml's tiled attention kernel: faster for long "
                      "prompts, but a prompt-cache hit is then no longer bit-identical to a miss")
    sha256: str = _f("", doc="expected sha256 of the GGUF; empty = not checked at start")


@dataclass(frozen=True)
class WorkersConfig:
    count: int = _f(1, 1, 64, doc="number of worker processes")
    slots: int = _f(1, 1, 64, doc="concurrent sequences per worker (= its dispatch credits), batched on one model copy")
    prompt_cache: bool = _f(True, doc="a free slot keeps the KV of its last sequence; a request sharing its prefix reuses it")
    prompt_cache_mib: int = _f(256, 0, 1 << 20,
                               doc="host memory per worker for KV states saved when a slot is reused (second cache level); 0 = none")
    heartbeat_interval_s: float = _f(1.0, 0.05, 60.0, doc="heartbeat period, both ways")
    liveness: int = _f(5, 1, 100, doc="missed heartbeat intervals before a worker is declared dead")
    ready_timeout_s: float = _f(120.0, 1.0, 3600.0, doc="time a worker may take to load and send READY")
    probe_interval_s: float = _f(30.0, 0.0, 86_400.0,
                                 doc="an idle worker gets a deep probe (1-token generation) this often; 0 = never")
    probe_timeout_s: float = _f(10.0, 0.1, 3600.0, doc="a deep probe that takes longer fails the worker")


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = _f(128, 1, 1 << 20, doc="default max_tokens of a GENERATE")
    temperature: float = _f(0.7, 0.0, 10.0, doc="default sampling temperature (0 = greedy)")
    top_p: float = _f(0.95, 0.0, 1.0, doc="default nucleus sampling threshold")
    top_k: int = _f(40, 0, 100_000, doc="default top-k (0 = disabled)")
    deadline_ms: int = _f(60_000, 1, 86_400_000, doc="default deadline of a request, queue time included")
    max_deadline_ms: int = _f(600_000, 1, 86_400_000, doc="largest deadline_ms a client may ask for")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = _f("127.0.0.1", doc="TCP address of the binary protocol")
    port: int = _f(8080, 0, 65535, doc="TCP port of the binary protocol")
    max_queue: int = _f(64, 0, 1_000_000, doc="requests that may wait for a worker credit; more are 'overloaded'")
    max_streams: int = _f(16, 1, 10_000, doc="open streams per connection")
    max_frame: int = _f(1 << 20, 64, 1 << 30, doc="largest frame accepted (bytes after the length field)")
    handshake_timeout_s: float = _f(5.0, 0.1, 3600.0, doc="time a client has to send HELLO")
    token: str = _f("", doc="if set, clients must send it in HELLO")
    write_buffer_bytes: int = _f(256 * 1024, 1024, 1 << 30,
                                 doc="per-connection write buffer (user space high-water mark and kernel SO_SNDBUF)")
    slow_client_timeout_s: float = _f(30.0, 0.1, 86_400.0,
                                      doc="a stream whose client takes no output this long (its token window "
                                          "spent) is cancelled with ERROR slow_client and its slot freed")
    park_after_s: float = _f(1.0, 0.0, 86_400.0,
                             doc="a stream whose client takes no output this long is parked: its worker "
                                 "frees the slot for others and resumes it when the client reads; 0 = never")
    token_window: int = _f(16, 1, 100_000,
                           doc="TOKEN messages a worker may send ahead of what a stream's client has taken")


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _f(False, doc="serve the OpenAI-compatible HTTP front")
    host: str = _f("127.0.0.1", doc="HTTP address")
    port: int = _f(8081, 0, 65535, doc="HTTP port")
    api_key: str = _f("", doc="if set, /v1 routes require `Authorization: Bearer KEY`; "
                              "env LLMCTL_API_KEY, when set and non-empty, overrides it")
    body_timeout_s: float = _f(10.0, 0.1, 3600.0,
                               doc="time a client has to send a request body; slower is 408")


@dataclass(frozen=True)
class ControlConfig:
    run_dir: str = _f(".llmctl", doc="pidfile, control socket and logs; relative to the config file")
    start_timeout_s: float = _f(180.0, 1.0, 3600.0, doc="`llmctl start` waits this long for READY")
    drain_timeout_s: float = _f(30.0, 0.0, 3600.0, doc="time in-flight requests get to finish on stop")
    stop_timeout_s: float = _f(5.0, 0.1, 600.0, doc="SIGTERM to SIGKILL grace per process")
    backoff_initial_s: float = _f(0.5, 0.0, 600.0, doc="first restart delay of a crashed process")
    backoff_max_s: float = _f(30.0, 0.0, 3600.0, doc="largest restart delay")
    stable_after_s: float = _f(20.0, 0.0, 86_400.0,
                               doc="uptime after which a death no longer counts towards the backoff")
    max_restarts: int = _f(5, 1, 1000, doc="crashes within restart_window_s that make a worker FATAL")
    restart_window_s: float = _f(120.0, 1.0, 86_400.0, doc="window of the flapping guard")
    log_max_bytes: int = _f(10 * 1024 * 1024, 1024, 1 << 40, doc="size at which a log file rotates")
    log_backups: int = _f(3, 0, 100, doc="rotated log files kept")


@dataclass(frozen=True)
class GpuConfig:
    vram_budget_mb: int = _f(DEFAULT_BUDGET_MB, 1, 1 << 24,
                             doc="VRAM all workers together may use (MiB, as nvidia-smi counts)")
    fit: bool = _f(False, doc="shrink workers.count, then model.n_ctx, then model.n_gpu_layers "
                              "until the estimate fits, instead of refusing to start")
    kv_type: str = _f("f16", choices=tuple(KV_TYPES),
                      doc="KV cache element type the estimate assumes")
    compute_buffer_mb: int = _f(-1, -1, 1 << 20,
                                doc="llama.cpp compute buffer per worker (MiB); -1 = derive from "
                                    "the model: n_ubatch x (n_vocab + n_ctx x n_head) x 4 B")
    cuda_overhead_mb: int = _f(DEFAULT_CUDA_OVERHEAD_MB, 0, 1 << 20,
                               doc="CUDA context + cuBLAS per worker process (MiB); calibrate "
                                   "on the card (docs/gpu.md)")
    on_breach: str = _f("alert", choices=ON_BREACH,
                        doc="measured use above the budget: alert = log it; restart_largest = "
                            "also restart the largest worker with fewer GPU layers")
    sample_interval_s: float = _f(2.0, 0.1, 3600.0, doc="how often the supervisor reads VRAM use")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    workers: WorkersConfig = WorkersConfig()
    generation: GenerationConfig = GenerationConfig()
    gateway: GatewayConfig = GatewayConfig()
    http: HttpConfig = HttpConfig()
    control: ControlConfig = ControlConfig()
    gpu: GpuConfig = GpuConfig()
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
    def pidfile(self) -> Path:
        return self.run_dir / "supervisor.pid"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def worker_threads(self) -> int:
        if self.model.threads:
            return self.model.threads
        return max(1, (os.cpu_count() or 1) // self.workers.count)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Config":
        raw = json.loads(text)
        source = raw.pop("source", "") or "<json>"
        return _build(raw, source, base=None)


_SECTION_TYPES = {
    "model": ModelConfig, "workers": WorkersConfig, "generation": GenerationConfig,
    "gateway": GatewayConfig, "http": HttpConfig, "control": ControlConfig, "gpu": GpuConfig,
}


_TYPES: dict[Any, type] = {"int": int, "float": float, "str": str, "bool": bool,
                           int: int, float: float, str: str, bool: bool}


def _check_value(where: str, f: dataclasses.Field, value: Any) -> Any:
    want = _TYPES[f.type]
    if want is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    md = f.metadata
    lo, hi, choices = md.get("lo"), md.get("hi"), md.get("choices")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{where}: {value!r} is out of range [{lo}, {hi}]")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _build(raw: Mapping[str, Any], source: str, base: Path | None) -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a table at the top level")
    sections: dict[str, Any] = {}
    for name in raw:
        if name not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section [{name}] "
                              f"(known: {', '.join(_SECTION_TYPES)})")
    for name, typ in _SECTION_TYPES.items():
        table = raw.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        known = {f.name: f for f in dataclasses.fields(typ)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key [{name}] {key} "
                                  f"(known: {', '.join(known)})")
            values[key] = _check_value(f"{source}: [{name}] {key}", known[key], value)
        sections[name] = typ(**values)
    cfg = Config(**sections, source=source)
    _cross_checks(cfg)
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


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def absolute(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
        control=dataclasses.replace(cfg.control, run_dir=absolute(cfg.control.run_dir)),
    )


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
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return _build(raw, str(p), base=p.resolve().parent)


def reference() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key: the README's config reference."""
    rows = []
    for name, typ in _SECTION_TYPES.items():
        for f in dataclasses.fields(typ):
            rows.append((name, f.name, f.default, f.metadata.get("doc", "")))
    return rows
