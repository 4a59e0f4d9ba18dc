"""The tables of ``config.toml``: one frozen msgspec Struct per section.

Every section forbids unknown fields; every key is typed with its allowed range
(``Annotated[int, Meta(ge=..., le=...)]``) or its choices (``Literal``), and documented
by its ``Meta(description=...)``: the annotation is what msgspec validates, what a
``ConfigError`` says is allowed (``config_explain.py``) and what the README's
configuration reference lists.  ``ModelEntry`` is one ``[[models]]`` entry.  The root
of the tree, ``Config``, and its loading are ``config.py``'s.
"""
# No ``from __future__ import annotations`` here: with string annotations msgspec would
# evaluate them through typing.get_type_hints on the first decode, which costs every
# process several milliseconds more than evaluating them once at import.

from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta


# The vocabulary of [gpu] and of the KV cache keys, shared with control/gpu_estimate.py.
DEFAULT_BUDGET_MB = 1024
DEFAULT_CUDA_OVERHEAD_MB = 150     # see docs/gpu.md: calibrate on the real card
# The KV cache element types llama.cpp's flash attention supports on the CPU and in CUDA
# (llama-server's -ctk/-ctv): (values per block, bytes per block), as ggml's type traits.
CacheType = Literal["f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
KV_TYPES = {"f16": (1, 2), "bf16": (1, 2), "f32": (1, 4), "q8_0": (32, 34), "q5_1": (32, 24),
            "q5_0": (32, 22), "q4_1": (32, 20), "q4_0": (32, 18)}
FlashAttn = Literal["auto", "on", "off"]
OnBreach = Literal["alert", "restart_largest"]
ON_BREACH: tuple[str, ...] = get_args(OnBreach)


Speculation = Literal["off", "ngram", "draft"]


# The keys a [model] section and a [[models]] entry share, typed and described once.
GgufPath = Annotated[str, Meta(
    description="GGUF file; relative paths are relative to the config file")]
NCtx = Annotated[int, Meta(ge=64, le=1 << 20,
                           description="context length of every sequence (tokens)")]
NGpuLayers = Annotated[int, Meta(
    ge=-1, le=10_000, description="layers offloaded to the GPU; -1 = all, 0 = CPU")]
CacheTypeK = Annotated[CacheType, Meta(
    description="element type of the KV cache's keys (llama.cpp's -ctk): f16, bf16, f32, "
                "or quantized q8_0, q5_1, q5_0, q4_1, q4_0 (q8_0 halves the memory of f16)")]
CacheTypeV = Annotated[CacheType, Meta(
    description="element type of the KV cache's values (-ctv); a quantized type needs "
                "flash_attn auto or on")]
FlashAttnKey = Annotated[FlashAttn, Meta(
    description="llama.cpp's flash attention: auto = on where the device supports it "
                "(always with a quantized V cache), on, off")]
Threads = Annotated[int, Meta(
    ge=0, le=256, description="CPU threads per worker; 0 = cores / workers")]
SpecMaxDraft = Annotated[int, Meta(
    ge=1, le=32, description="the most draft tokens a sequence verifies in one step")]


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    path: GgufPath = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    n_ctx: NCtx = 2048
    n_gpu_layers: NGpuLayers = -1
    cache_type_k: CacheTypeK = "f16"
    cache_type_v: CacheTypeV = "f16"
    flash_attn: FlashAttnKey = "auto"
    threads: Threads = 0
    n_batch: Annotated[int, Meta(
        ge=1, le=8192,
        description="prefill chunk size (tokens); cancellation is checked between chunks. "
                    "On the CPU, 64 or more goes through ggml's tiled attention kernel: faster for long "
                    "prompts, but a prompt-cache hit is then no longer bit-identical to a miss")] = 63
    sha256: Annotated[str, Meta(
        description="expected sha256 of the GGUF; empty = not checked at start")] = ""
    speculative: Annotated[Speculation, Meta(
        description="ngram = every sequence drafts the tokens that followed the latest earlier "
                    "occurrence of its last 2-4 tokens (prompt and output) and verifies the draft "
                    "in the step's one llama_decode; draft = a draft model drafts them (needs "
                    "[[models]]: see its `draft`); off = one token a step (a request's "
                    "`speculative: false` turns it off for that request)")] = "off"
    spec_max_draft: SpecMaxDraft = 8
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
    responses_max_bytes: Annotated[int, Meta(
        ge=0, le=1 << 40,
        description="stored Responses API responses (`store`, `previous_response_id`): "
                    "bytes kept in <run_dir>/responses.sqlite3, oldest evicted first; "
                    "0 = none stored")] = 64 * 1024 * 1024
    responses_ttl_s: Annotated[float, Meta(
        ge=1.0, le=30 * 86_400.0,
        description="a stored response is deleted this long after it was made")] = 7 * 86_400.0


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


SchedulingPolicy = Literal["fair", "fifo"]


class SchedulingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    policy: Annotated[SchedulingPolicy, Meta(
        description="fair = waiting work is ordered by the tenants' weighted fair share of "
                    "the tokens served, then a request's priority, then least attained "
                    "service, and a running request yields its slot (parked, resumed later "
                    "where it stopped) to a waiting one that deserves it more; fifo = first "
                    "come, first served, a slot held until its request ends")] = "fair"
    quantum_tokens: Annotated[int, Meta(
        ge=1, le=1 << 20,
        description="a running request that has received this many tokens more than a "
                    "waiting one of the same tenant and priority yields its slot to it; and "
                    "the slice it runs before a starving request takes its slot")] = 128
    min_run_tokens: Annotated[int, Meta(
        ge=1, le=1 << 20,
        description="a request runs at least this many tokens after it starts or resumes "
                    "before it can be made to yield")] = 16
    starvation_s: Annotated[float, Meta(
        ge=0.1, le=86_400.0,
        description="a request waiting this long for its first token (three times this once "
                    "started and parked) goes first, whatever its tenant, priority or "
                    "service so far")] = 10.0
    usage_half_life_s: Annotated[float, Meta(
        ge=0.1, le=86_400.0,
        description="tenants' fair shares are judged on the tokens served to them, counted "
                    "with this half-life")] = 30.0
    keys_file: Annotated[str, Meta(
        description="more tenant keys, one `TENANT KEY` a line (KEY as in [[tenants]] keys; "
                    "# comments); relative to the config file; read at start and reload")] = ""
    require_key: Annotated[bool, Meta(
        description="a request without a tenant's key (or [http] api_key / [gateway] token) "
                    "is refused; false = it is the tenant \"default\"")] = False


class TenantEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One ``[[tenants]]`` entry: who requests belong to, their share and their limits."""
    name: Annotated[str, Meta(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the tenant's name (in /metrics, status); \"default\" is the tenant of "
                    "requests without a key")]
    keys: Annotated[tuple[str, ...], Meta(
        description="its API keys (HTTP Bearer or x-api-key) and HELLO tokens (binary "
                    "protocol): the key itself, or sha256:HEX of it")] = ()
    share: Annotated[float, Meta(
        ge=0.001, le=1e6, description="its weight in the fair share of tokens served")] = 1.0
    max_streams: Annotated[int, Meta(
        ge=0, le=1_000_000, description="its requests open at once (queued or running); "
                                        "0 = no limit")] = 0
    max_queued: Annotated[int, Meta(
        ge=0, le=1_000_000, description="its requests waiting at once; 0 = no limit")] = 0
    requests_per_min: Annotated[int, Meta(
        ge=0, le=1 << 30, description="requests admitted per minute; 0 = no limit")] = 0
    tokens_per_min: Annotated[int, Meta(
        ge=0, le=1 << 40, description="tokens generated per minute; 0 = no limit")] = 0


LoadPolicy = Literal["always", "on_demand"]


class ModelEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One served model: a ``[[models]]`` entry, or the one ``[model]`` section."""
    name: Annotated[str, Meta(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="the model's name: the `model` of a request (OpenAI's and GENERATE's); "
                    "the first entry is the default model")]
    path: GgufPath
    n_ctx: NCtx = 2048
    n_gpu_layers: NGpuLayers = -1
    cache_type_k: CacheTypeK = "f16"
    cache_type_v: CacheTypeV = "f16"
    flash_attn: FlashAttnKey = "auto"
    workers: Annotated[int, Meta(ge=1, le=64, description="worker processes of this model")] = 1
    slots: Annotated[int, Meta(
        ge=1, le=64, description="concurrent sequences per worker (= its dispatch credits)")] = 1
    threads: Threads = 0
    load: Annotated[LoadPolicy, Meta(
        description="always = loaded at start and never evicted; on_demand = loaded by the "
                    "first request for it (or `llmctl load`), unloaded after keep_alive_s idle "
                    "or to make room for another")] = "always"
    keep_alive_s: Annotated[float, Meta(
        ge=0.0, le=86_400.0 * 365,
        description="an on_demand model idle this long (no request queued or running) "
                    "is unloaded; 0 = only to make room")] = 300.0
    speculative: Annotated[Speculation, Meta(
        description="ngram = every sequence drafts the tokens that followed the latest earlier "
                    "occurrence of its last 2-4 tokens (prompt and output) and verifies the draft "
                    "in the step's one llama_decode; draft = the model of entry `draft` drafts "
                    "them, greedy, and the step's llama_decode verifies them alike; off = one "
                    "token a step (a request's `speculative: false` turns it off for that "
                    "request)")] = "off"
    spec_max_draft: SpecMaxDraft = 8
    draft: Annotated[str, Meta(
        max_length=128,
        description="with speculative = \"draft\": the name of another [[models]] entry whose "
                    "model drafts for this one, loaded in this model's workers beside it (its "
                    "weights and KV count in this model's memory plan); it must have the same "
                    "vocabulary and should be much smaller: a draft pays when its token costs a "
                    "small fraction of this model's. The entry is served under its own name too "
                    "(load = \"on_demand\" keeps its own workers off until asked for)")] = ""
