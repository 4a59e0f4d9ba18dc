"""VRAM estimate of a worker, read from the GGUF itself, and the plan against the budget.

Everything here is pure arithmetic over a ``ModelInfo`` (read once from the file with the
``gguf`` package's ``GGUFReader``); nothing touches a GPU.  Sizes are in bytes; "MiB" is
2**20 bytes, which is what nvidia-smi and NVML report and what ``vram_budget_mb`` means.

Which layers llama.cpp puts on the GPU (src/llama-model.cpp, ``load_tensors``, the version
vendored by llama-cpp-python 0.3.36)::

    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    layer il (0..n_layer-1 = the repeating blocks, n_layer = the output layer) is on the
    GPU iff i_gpu_start <= il  and  il - i_gpu_start < min(n_gpu_layers, n_layer + 1)

so with ``k = n_gpu_layers``: k = 0 puts nothing on the GPU; 1 <= k <= n_layer puts the
output layer and the *last* k - 1 blocks there; k >= n_layer + 1 (and -1, which
llama-cpp-python turns into INT32_MAX) puts every block and the output layer there
(llama.cpp logs "offloaded n_layer+1/n_layer+1 layers to GPU").  The input layer
(``token_embd``) always stays on the CPU.  The output layer is ``output_norm.*`` and
``output.weight``; a model without ``output.weight`` (tied embeddings, e.g. SmolLM2 and
Gemma) gets a *second copy* of ``token_embd.weight`` in the output layer's buffer
(``TENSOR_DUPLICATED``), so that copy counts as GPU memory.

Terms per worker (each process has its own CUDA context and its own copy of everything):

* weights  = sum of ``n_bytes`` of the tensors of the offloaded blocks (``blk.N.*``)
             + the output layer's tensors when the output layer is offloaded;
* KV cache = n_ctx x slots x offloaded blocks x n_kv_heads
             x (head_dim_k x bytes per K element + head_dim_v x bytes per V element),
             the elements of ``cache_type_k`` / ``cache_type_v`` (f16 = 2, f32 = 4,
             q8_0 = 34/32, q4_0 = 18/32: blocks of 32 values); with f16 and
             head_dim_k == head_dim_v this is the familiar
             n_ctx x slots x layers x n_kv_heads x head_dim x 2 (K, V) x 2;
* compute  = ``compute_buffer_mb`` if >= 0, else derived: the f32 logits of one ubatch
             (n_ubatch x n_vocab x 4, if the output layer is offloaded) + the f32 attention
             scores of one layer (n_ubatch x n_ctx x slots x n_head x 4, if a block is
             offloaded; counted whatever ``flash_attn``, which does not materialise them
             in full: an upper bound).  The two are never
             alive together, so their sum leaves room for the smaller activations.
             n_ubatch = min(n_batch, 512), llama-cpp-python's rule;
* CUDA     = ``cuda_overhead_mb`` (context, cuBLAS workspace, pool slack), if anything
             is offloaded.

Not modelled: sliding-window layers (their KV is counted in full: conservative), KV
padding of n_ctx (none for multiples of 256), per-layer head counts (the maximum is used).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import msgspec

from llmctl.common.config import DEFAULT_BUDGET_MB, DEFAULT_CUDA_OVERHEAD_MB, KV_TYPES

MiB = 1 << 20
N_UBATCH_MAX = 512                 # llama-cpp-python's default n_ubatch; n_ubatch = min(n_batch, it)
MIN_FIT_CTX = 256

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class ModelInfoError(ValueError):
    """The GGUF cannot be read, or lacks the metadata the estimate needs."""


class CacheTypeError(ModelInfoError):
    """The model's head size is not a whole number of the quantized cache type's blocks:
    llama.cpp refuses to create the context."""


class VramBudgetError(ValueError):
    """The configuration does not fit ``vram_budget_mb``; the message shows the arithmetic."""

    def __init__(self, message: str, plan: "Plan | None" = None) -> None:
        super().__init__(message)
        self.plan = plan


# ---- the model, read from the file ---------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    path: str
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    block_bytes: tuple[int, ...]        # n_bytes of blk.N.*, index N
    output_bytes: int                   # the output layer's tensors (tied copy included)
    output_tensors: tuple[str, ...]
    tied_output: bool                   # no output.weight: token_embd is duplicated on the GPU
    cpu_bytes: int                      # token_embd and the other input tensors: never on the GPU
    file_bytes: int


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read layer counts, head geometry and tensor sizes from a GGUF file."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise ModelInfoError(f"{p}: cannot read model: {exc.strerror or exc}") from None
    return _read_model_cached(os.path.realpath(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_model_cached(path: str, size: int, mtime_ns: int) -> ModelInfo:
    from gguf import GGUFReader

    try:
        r = GGUFReader(path, "r")
    except (OSError, ValueError) as exc:
        raise ModelInfoError(f"{path}: not a readable GGUF file: {exc}") from None
    arch = _field(r, "general.architecture")
    if not arch:
        raise ModelInfoError(f"{path}: no general.architecture in the GGUF metadata")

    def need(key: str) -> Any:
        v = _field(r, f"{arch}.{key}")
        if v is None:
            raise ModelInfoError(f"{path}: no {arch}.{key} in the GGUF metadata")
        return v

    def as_int(v: Any) -> int:     # some models store per-layer arrays: take the largest
        return int(max(v)) if isinstance(v, (list, tuple)) else int(v)

    n_layer = as_int(need("block_count"))
    n_embd = as_int(need("embedding_length"))
    n_head = as_int(need("attention.head_count"))
    kv = _field(r, f"{arch}.attention.head_count_kv")
    n_head_kv = as_int(kv) if kv is not None else n_head
    if n_head <= 0:
        raise ModelInfoError(f"{path}: {arch}.attention.head_count is {n_head}")
    kl = _field(r, f"{arch}.attention.key_length")
    vl = _field(r, f"{arch}.attention.value_length")
    head_dim_k = as_int(kl) if kl is not None else n_embd // n_head
    head_dim_v = as_int(vl) if vl is not None else head_dim_k

    tensors = {t.name: t for t in r.tensors}
    vocab = _field(r, f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in r.fields:
        vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    if vocab is None:
        raise ModelInfoError(f"{path}: cannot tell the vocabulary size")

    blocks = [0] * n_layer
    out_names: list[str] = []
    out_bytes = cpu_bytes = 0
    for t in r.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            blocks[int(m.group(1))] += int(t.n_bytes)
        elif t.name.split(".", 1)[0].startswith("output"):
            out_names.append(t.name)
            out_bytes += int(t.n_bytes)
        else:
            cpu_bytes += int(t.n_bytes)
    tied = "output.weight" not in tensors and "token_embd.weight" in tensors
    if tied:
        out_names.append("token_embd.weight (tied: a second copy)")
        out_bytes += int(tensors["token_embd.weight"].n_bytes)
    return ModelInfo(path=path, name=str(_field(r, "general.name") or os.path.basename(path)),
                     arch=str(arch), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                     n_head_kv=n_head_kv, head_dim_k=head_dim_k, head_dim_v=head_dim_v,
                     n_vocab=int(vocab), block_bytes=tuple(blocks), output_bytes=out_bytes,
                     output_tensors=tuple(out_names), tied_output=tied, cpu_bytes=cpu_bytes,
                     file_bytes=size)


# ---- one worker's estimate ------------------------------------------------------------------

def gpu_layout(n_gpu_layers: int, n_layer: int) -> tuple[int, bool]:
    """(blocks on the GPU, output layer on the GPU) for llama.cpp's n_gpu_layers rule."""
    k = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    return max(k - 1, 0), k >= 1


def effective_gpu_layers(n_gpu_layers: int, n_layer: int) -> int:
    """The n_gpu_layers llama.cpp really uses: -1 and anything above n_layer+1 -> n_layer+1."""
    return n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


@dataclass(frozen=True)
class Estimate:
    model: ModelInfo
    n_ctx: int
    slots: int
    n_gpu_layers: int               # as configured
    n_batch: int
    cache_type_k: str
    cache_type_v: str
    compute_buffer_mb: int          # -1 = derived
    cuda_overhead_mb: int
    blocks_on_gpu: int
    output_on_gpu: bool
    weights_blocks: int
    weights_output: int
    kv: int
    compute_logits: int
    compute_scores: int
    compute: int
    overhead: int

    @property
    def weights(self) -> int:
        return self.weights_blocks + self.weights_output

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead

    @property
    def n_ubatch(self) -> int:
        return min(self.n_batch, N_UBATCH_MAX)

    @property
    def per_layer(self) -> int:
        """Bytes one more offloaded block costs (its weights, on average, and its KV)."""
        m = self.model
        avg = sum(m.block_bytes) // m.n_layer if m.n_layer else 0
        return avg + (self.kv // self.blocks_on_gpu if self.blocks_on_gpu else 0)

    def rows(self) -> list[tuple[str, str, int]]:
        """(term, its factors, bytes) for every term."""
        m = self.model
        first = m.n_layer - self.blocks_on_gpu
        blocks = (f"{self.blocks_on_gpu} of {m.n_layer} blocks (blk.{first}..blk.{m.n_layer - 1})"
                  f" = {self.weights_blocks:,} B" if self.blocks_on_gpu else "0 blocks")
        out = (f" + output layer ({', '.join(m.output_tensors)}) = {self.weights_output:,} B"
               if self.output_on_gpu else " + output layer on CPU")
        def elem(t: str) -> str:
            per, size = KV_TYPES[t]
            return (f"{size} B" if per == 1 else f"{size}/{per} B") + f" ({t})"
        k, v = self.cache_type_k, self.cache_type_v
        if m.head_dim_k == m.head_dim_v and k == v:
            dims = f"head_dim {m.head_dim_k} x 2 (K and V) x {elem(k)}"
        else:
            dims = f"(k_dim {m.head_dim_k} x {elem(k)} + v_dim {m.head_dim_v} x {elem(v)})"
        kv = (f"n_ctx {self.n_ctx} x slots {self.slots} x layers {self.blocks_on_gpu} x "
              f"kv_heads {m.n_head_kv} x {dims}")
        if self.compute_buffer_mb >= 0:
            comp = f"compute_buffer_mb {self.compute_buffer_mb} x 1 MiB" if self.compute else "-"
        else:
            parts = []
            if self.compute_logits:
                parts.append(f"logits n_ubatch {self.n_ubatch} x n_vocab {m.n_vocab} x 4 B"
                             f" = {self.compute_logits:,} B")
            if self.compute_scores:
                parts.append(f"scores n_ubatch {self.n_ubatch} x n_kv {self.n_ctx * self.slots}"
                             f" x n_head {m.n_head} x 4 B = {self.compute_scores:,} B")
            comp = " + ".join(parts) or "-"
        cuda = f"cuda_overhead_mb {self.cuda_overhead_mb} x 1 MiB" if self.overhead else "-"
        return [("weights", blocks + out, self.weights), ("KV cache", kv, self.kv),
                ("compute", comp, self.compute), ("CUDA", cuda, self.overhead)]

    def table(self) -> str:
        rows = self.rows()
        lines = [f"  {term:<9} {why}\n  {'':<9} = {n:>13,} B  {_mib(n):>11}" for term, why, n in rows]
        lines.append(f"  {'total':<9} per worker = {self.total:,} B  {_mib(self.total)}")
        return "\n".join(lines)

    def explain(self) -> str:
        m = self.model
        k = effective_gpu_layers(self.n_gpu_layers, m.n_layer)
        head = (f"VRAM per worker: {m.name} ({m.arch}, {m.n_layer} blocks, "
                f"{os.path.basename(m.path)}, {_mib(m.file_bytes)} file); "
                f"n_gpu_layers {self.n_gpu_layers} -> {k}/{m.n_layer + 1} layers on the GPU")
        return head + "\n" + self.table()


def estimate(info: ModelInfo, *, n_ctx: int, slots: int = 1, n_gpu_layers: int = -1,
             n_batch: int = N_UBATCH_MAX, cache_type_k: str = "f16", cache_type_v: str = "f16",
             compute_buffer_mb: int = -1,
             cuda_overhead_mb: int = DEFAULT_CUDA_OVERHEAD_MB) -> Estimate:
    """The VRAM one worker needs; n_gpu_layers = 0 needs none.

    Raises CacheTypeError for a quantized cache type whose blocks do not divide the
    model's head size (llama.cpp would refuse the context)."""
    for key, t, dim in (("cache_type_k", cache_type_k, info.head_dim_k),
                        ("cache_type_v", cache_type_v, info.head_dim_v)):
        if t not in KV_TYPES:
            raise ValueError(f"{key} {t!r} is not one of {', '.join(KV_TYPES)}")
        if dim % KV_TYPES[t][0]:
            raise CacheTypeError(
                f"{info.path}: {key} = {t!r} stores blocks of {KV_TYPES[t][0]} values, which do "
                f"not divide this model's head size {dim}: llama.cpp refuses it; choose f16, "
                "bf16 or f32")
    blocks, output = gpu_layout(n_gpu_layers, info.n_layer)
    first = info.n_layer - blocks
    w_blocks = sum(info.block_bytes[first:])
    w_out = info.output_bytes if output else 0
    (per_k, size_k), (per_v, size_v) = KV_TYPES[cache_type_k], KV_TYPES[cache_type_v]
    row = (info.n_head_kv * info.head_dim_k // per_k * size_k
           + info.n_head_kv * info.head_dim_v // per_v * size_v)
    kv = n_ctx * slots * blocks * row
    n_ubatch = min(n_batch, N_UBATCH_MAX)
    on_gpu = blocks > 0 or output
    logits = scores = 0
    if compute_buffer_mb >= 0:
        compute = compute_buffer_mb * MiB if on_gpu else 0
    else:
        logits = n_ubatch * info.n_vocab * 4 if output else 0
        scores = n_ubatch * n_ctx * slots * info.n_head * 4 if blocks else 0
        compute = logits + scores
    return Estimate(model=info, n_ctx=n_ctx, slots=slots, n_gpu_layers=n_gpu_layers,
                    n_batch=n_batch, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                    compute_buffer_mb=compute_buffer_mb,
                    cuda_overhead_mb=cuda_overhead_mb, blocks_on_gpu=blocks, output_on_gpu=output,
                    weights_blocks=w_blocks, weights_output=w_out, kv=kv, compute_logits=logits,
                    compute_scores=scores, compute=compute,
                    overhead=cuda_overhead_mb * MiB if on_gpu else 0)


# ---- the plan: all workers against the budget -------------------------------------------------

@dataclass(frozen=True)
class Plan:
    workers: int
    estimate: Estimate              # per worker, with the plan's n_ctx / n_gpu_layers
    budget_mb: int
    changes: tuple[str, ...] = ()   # "workers.count 2 -> 1", ... (only when fitted)

    @property
    def n_ctx(self) -> int:
        return self.estimate.n_ctx

    @property
    def n_gpu_layers(self) -> int:
        return self.estimate.n_gpu_layers

    @property
    def total(self) -> int:
        return self.workers * self.estimate.total

    @property
    def budget(self) -> int:
        return self.budget_mb * MiB

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def summary(self) -> str:
        verdict = (f"fits ({_mib(self.budget - self.total)} to spare)" if self.fits
                   else f"EXCEEDS it by {_mib(self.total - self.budget)}")
        return (f"{self.workers} worker(s) x {_mib(self.estimate.total)} = {_mib(self.total)}"
                f" vs vram_budget_mb {self.budget_mb} ({_mib(self.budget)}): {verdict}")

    def text(self) -> str:
        lines = [self.estimate.explain(), self.summary()]
        if self.changes:
            lines.append("fit = true changed: " + "; ".join(self.changes))
        return "\n".join(lines)

    def apply(self, cfg: Any) -> Any:
        """The config with the plan's workers.count, model.n_ctx and model.n_gpu_layers."""
        replace = msgspec.structs.replace
        return replace(cfg, workers=replace(cfg.workers, count=self.workers),
                       model=replace(cfg.model, n_ctx=self.n_ctx, n_gpu_layers=self.n_gpu_layers))


def _shrink(start: int, candidates: Iterable[int], fits) -> int:
    """The first candidate that fits, else the last one (start if there are none)."""
    last = start
    for c in candidates:
        last = c
        if fits(c):
            break
    return last


def plan(info: ModelInfo, *, workers: int, n_ctx: int, slots: int = 1, n_gpu_layers: int = -1,
         n_batch: int = N_UBATCH_MAX, budget_mb: int = DEFAULT_BUDGET_MB, fit: bool = False,
         cache_type_k: str = "f16", cache_type_v: str = "f16", compute_buffer_mb: int = -1,
         cuda_overhead_mb: int = DEFAULT_CUDA_OVERHEAD_MB) -> Plan:
    """A plan that fits the budget, shrunk if ``fit``; raises VramBudgetError otherwise.

    Shrinking order: fewer workers (down to 1), then n_ctx halved (not below 256), then
    fewer GPU layers (down to 0, which always fits).  Each change is listed in the plan.
    """
    def est(ctx: int, ngl: int) -> Estimate:
        return estimate(info, n_ctx=ctx, slots=slots, n_gpu_layers=ngl, n_batch=n_batch,
                        cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                        compute_buffer_mb=compute_buffer_mb,
                        cuda_overhead_mb=cuda_overhead_mb)

    first = Plan(workers, est(n_ctx, n_gpu_layers), budget_mb)
    if first.fits:
        return first
    if not fit:
        raise VramBudgetError(
            f"the configuration does not fit the VRAM budget\n{first.text()}\n"
            "lower workers.count, model.n_ctx or model.n_gpu_layers, raise "
            "[gpu] vram_budget_mb, or set [gpu] fit = true to shrink automatically", first)

    def fits(w: int, ctx: int, ngl: int) -> bool:
        return Plan(w, est(ctx, ngl), budget_mb).fits

    w = _shrink(workers, range(workers - 1, 0, -1), lambda c: fits(c, n_ctx, n_gpu_layers))
    ctxs, c = [], n_ctx
    while c > MIN_FIT_CTX:
        c = max(MIN_FIT_CTX, c // 2)
        ctxs.append(c)
    ctx = n_ctx if fits(w, n_ctx, n_gpu_layers) else _shrink(
        n_ctx, ctxs, lambda c: fits(w, c, n_gpu_layers))
    k = effective_gpu_layers(n_gpu_layers, info.n_layer)
    ngl = n_gpu_layers if fits(w, ctx, n_gpu_layers) else _shrink(
        k, range(k - 1, -1, -1), lambda g: fits(w, ctx, g))
    changes = []
    if w != workers:
        changes.append(f"workers.count {workers} -> {w}")
    if ctx != n_ctx:
        changes.append(f"model.n_ctx {n_ctx} -> {ctx}")
    if ngl != n_gpu_layers:
        blocks, out = gpu_layout(ngl, info.n_layer)
        where = f"{blocks} of {info.n_layer} blocks" + (" + output layer" if out else "")
        changes.append(f"model.n_gpu_layers {n_gpu_layers} -> {ngl} ({where} on the GPU)")
    return Plan(w, est(ctx, ngl), budget_mb, tuple(changes))
