"""The GPU memory governor: the estimate against hand arithmetic on the real GGUF, the plan
(refuse / fit), the breach policy with injected readings, and NVML's clean absence."""
from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from llmctl.common import config, config_explain

from llmctl.control import gpu
from llmctl.common.config import GpuConfig
from tests.fakes import FakeReader
from llmctl.control.gpu import (Action, GpuMonitor, NvmlReader, VramBudgetError,
                         check, estimate, plan, read_model)
from llmctl.control.gpu_estimate import MiB, ModelInfo

MODEL = Path(__file__).parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="model not fetched (make setup)")


@pytest.fixture(scope="module")
def gguf_file():
    from gguf import GGUFReader

    return GGUFReader(str(MODEL), "r")


@pytest.fixture(scope="module")
def info():
    return read_model(MODEL)


# ---- the estimate on the real SmolLM2 GGUF ------------------------------------------------------

@needs_model
def test_metadata_read_from_the_file(gguf_file, info):
    meta = {k: f.contents() for k, f in gguf_file.fields.items() if k.startswith("llama.")}
    assert gguf_file.fields["general.architecture"].contents() == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.attention.head_count"] == 9
    assert meta["llama.attention.head_count_kv"] == 3
    assert meta["llama.embedding_length"] == 576            # head_dim = 576 / 9 = 64
    assert "llama.attention.key_length" not in meta
    assert (info.n_layer, info.n_head, info.n_head_kv) == (30, 9, 3)
    assert info.head_dim_k == info.head_dim_v == 576 // 9 == 64
    assert info.n_vocab == 49152
    assert info.tied_output             # no output.weight: token_embd doubles as the output


@needs_model
def test_kv_term_is_the_hand_formula(info):
    # n_ctx x slots x n_layers x n_kv_heads x head_dim x 2 (K and V) x 2 bytes (f16)
    e = estimate(info, n_ctx=2048, slots=1, n_gpu_layers=-1, n_batch=256)
    assert e.kv == 2048 * 1 * 30 * 3 * 64 * 2 * 2 == 47_185_920
    e = estimate(info, n_ctx=4096, slots=2, n_gpu_layers=-1, cache_type_k="f32",
                 cache_type_v="f32")
    assert e.kv == 4096 * 2 * 30 * 3 * 64 * 2 * 4
    # q8_0: blocks of 32 values stored in 34 bytes; a K (or V) row is 3 x 64 = 192 values
    e = estimate(info, n_ctx=2048, slots=1, n_gpu_layers=-1, cache_type_k="q8_0",
                 cache_type_v="q8_0")
    assert e.kv == 2048 * 1 * 30 * (192 // 32 * 34) * 2
    assert "head_dim 64 x 2 (K and V) x 34/32 B (q8_0)" in e.explain()
    # K and V of different types: q8_0 keys, q4_0 values (18 bytes a block)
    e = estimate(info, n_ctx=2048, slots=1, n_gpu_layers=-1, cache_type_k="q8_0",
                 cache_type_v="q4_0")
    assert e.kv == 2048 * 1 * 30 * (192 // 32 * 34 + 192 // 32 * 18)
    assert "(k_dim 64 x 34/32 B (q8_0) + v_dim 64 x 18/32 B (q4_0))" in e.explain()
    # n_gpu_layers = 10: the output layer and the last 9 blocks
    assert estimate(info, n_ctx=2048, n_gpu_layers=10).kv == 2048 * 9 * 3 * 64 * 2 * 2


@needs_model
def test_weights_term_is_the_offloaded_tensors(gguf_file, info):
    size = {t.name: int(t.n_bytes) for t in gguf_file.tensors}
    blocks = sum(n for name, n in size.items() if name.startswith("blk."))
    assert "output.weight" not in size
    output = size["output_norm.weight"] + size["token_embd.weight"]   # tied copy on the GPU
    e = estimate(info, n_ctx=2048, n_gpu_layers=-1, n_batch=256)
    assert (e.blocks_on_gpu, e.output_on_gpu) == (30, True)
    assert e.weights_blocks == blocks and e.weights_output == output
    assert e.weights == blocks + output == 96_576_768
    file_size = os.path.getsize(MODEL)
    assert 0.9 * file_size < e.weights < file_size          # 92.1 MiB of a 93.8 MiB file

    def blk(first):
        return sum(n for name, n in size.items()
                   if name.startswith("blk.") and int(name.split(".")[1]) >= first)

    # llama.cpp: i_gpu_start = n_layer + 1 - n_gpu_layers; the output layer is the first
    # GPU layer, then the blocks from the end
    assert estimate(info, n_ctx=2048, n_gpu_layers=1).weights == output
    assert estimate(info, n_ctx=2048, n_gpu_layers=10).weights == output + blk(21)
    assert estimate(info, n_ctx=2048, n_gpu_layers=30).weights == output + blk(1)
    assert estimate(info, n_ctx=2048, n_gpu_layers=31).weights == e.weights
    assert estimate(info, n_ctx=2048, n_gpu_layers=500).weights == e.weights


@needs_model
def test_compute_and_overhead_terms(info):
    e = estimate(info, n_ctx=2048, n_gpu_layers=-1, n_batch=256, cuda_overhead_mb=150)
    n_ubatch = min(256, 512)
    assert e.compute_logits == n_ubatch * 49152 * 4
    assert e.compute_scores == n_ubatch * 2048 * 9 * 4
    assert e.compute == e.compute_logits + e.compute_scores
    assert e.overhead == 150 * MiB
    assert e.total == e.weights + e.kv + e.compute + e.overhead
    fixed = estimate(info, n_ctx=2048, n_gpu_layers=-1, compute_buffer_mb=80)
    assert fixed.compute == 80 * MiB
    assert estimate(info, n_ctx=2048, n_gpu_layers=1).compute_scores == 0   # no block on GPU


@needs_model
def test_nothing_on_the_gpu_with_zero_layers(info):
    e = estimate(info, n_ctx=8192, slots=4, n_gpu_layers=0)
    assert e.total == 0
    assert plan(info, workers=8, n_ctx=8192, slots=4, n_gpu_layers=0, budget_mb=1).fits


@needs_model
def test_explain_shows_every_factor(info):
    text = estimate(info, n_ctx=2048, n_gpu_layers=-1, n_batch=256).explain()
    assert "n_ctx 2048 x slots 1 x layers 30 x kv_heads 3 x head_dim 64 x 2 (K and V) x 2 B (f16)" \
        in text
    assert "47,185,920 B" in text and "96,576,768 B" in text
    assert "logits n_ubatch 256 x n_vocab 49152 x 4 B" in text
    assert "scores n_ubatch 256 x n_kv 2048 x n_head 9 x 4 B" in text
    assert "cuda_overhead_mb 150 x 1 MiB" in text
    assert "31/31 layers on the GPU" in text


# ---- the plan ----------------------------------------------------------------------------------

@needs_model
def test_default_config_fits_one_and_two_workers(info):
    one = plan(info, workers=1, n_ctx=2048, n_batch=256)
    two = plan(info, workers=2, n_ctx=2048, n_batch=256)
    assert one.fits and two.fits and not one.changes
    assert two.total == 2 * one.total
    assert one.estimate.total == 96_576_768 + 47_185_920 + 69_206_016 + 150 * MiB


@needs_model
def test_refused_with_the_arithmetic(info):
    with pytest.raises(VramBudgetError) as exc:
        plan(info, workers=2, n_ctx=2048, n_batch=256, budget_mb=600)
    msg = str(exc.value)
    assert "does not fit" in msg
    assert "2 worker(s) x 353.1 MiB = 706.2 MiB vs vram_budget_mb 600" in msg
    assert "n_ctx 2048 x slots 1 x layers 30 x kv_heads 3 x head_dim 64" in msg
    assert "47,185,920 B" in msg and "fit = true" in msg
    assert exc.value.plan is not None and not exc.value.plan.fits


@needs_model
def test_fit_drops_workers_first(info):
    p = plan(info, workers=3, n_ctx=2048, n_batch=256, budget_mb=800, fit=True)
    assert p.fits and p.workers == 2 and p.n_ctx == 2048 and p.n_gpu_layers == -1
    assert p.changes == ("workers.count 3 -> 2",)
    assert "fit = true changed: workers.count 3 -> 2" in p.text()


@needs_model
def test_fit_then_halves_the_context(info):
    one_at_512 = plan(info, workers=1, n_ctx=512, n_batch=256).total
    budget = -(-one_at_512 // MiB)          # enough for n_ctx 512, not for 1024
    p = plan(info, workers=2, n_ctx=2048, n_batch=256, budget_mb=budget, fit=True)
    assert p.fits and (p.workers, p.n_ctx, p.n_gpu_layers) == (1, 512, -1)
    assert p.changes == ("workers.count 2 -> 1", "model.n_ctx 2048 -> 512")


@needs_model
def test_fit_then_fewer_gpu_layers(info):
    p = plan(info, workers=2, n_ctx=4096, n_batch=256, budget_mb=240, fit=True)
    assert p.fits and p.workers == 1 and p.n_ctx == 256
    assert 0 < p.n_gpu_layers < 31
    assert p.changes[:2] == ("workers.count 2 -> 1", "model.n_ctx 4096 -> 256")
    assert p.changes[2].startswith(f"model.n_gpu_layers -1 -> {p.n_gpu_layers} (")
    # one more layer would not have fitted
    bigger = plan(info, workers=1, n_ctx=256, n_batch=256, n_gpu_layers=p.n_gpu_layers + 1,
                  budget_mb=10_000)
    assert bigger.total > 240 * MiB
    tiny = plan(info, workers=1, n_ctx=2048, budget_mb=1, fit=True)
    assert tiny.n_gpu_layers == 0 and tiny.total == 0
    assert tiny.changes[-1] == "model.n_gpu_layers -1 -> 0 (0 of 30 blocks on the GPU)"


@needs_model
def test_plan_applies_to_a_config(info):
    cfg = config.Config()
    cfg = replace(cfg, model=replace(cfg.model, path=str(MODEL)),
                  workers=replace(cfg.workers, count=2))
    p = gpu.plan_for_config(cfg, GpuConfig(vram_budget_mb=500, fit=True))
    new = p.apply(cfg)
    assert (new.workers.count, new.model.n_ctx, new.model.n_gpu_layers) == \
        (p.workers, p.n_ctx, p.n_gpu_layers) == (1, 2048, -1)
    with pytest.raises(VramBudgetError):
        gpu.plan_for_config(cfg, GpuConfig(vram_budget_mb=500))


def synthetic(n_layer: int, block: int, out: int) -> ModelInfo:
    return ModelInfo(path="x.gguf", name="x", arch="llama", n_layer=n_layer, n_embd=512,
                     n_head=8, n_head_kv=2, head_dim_k=64, head_dim_v=64, n_vocab=32000,
                     block_bytes=(block,) * n_layer, output_bytes=out, output_tensors=("output",),
                     tied_output=False, cpu_bytes=out, file_bytes=out * 2 + block * n_layer)


@settings(max_examples=60, deadline=None)
@given(n_layer=st.integers(1, 48), block=st.integers(0, 64 * MiB), out=st.integers(0, 256 * MiB),
       workers=st.integers(1, 6), ctx=st.sampled_from([64, 256, 300, 2048, 32768]),
       slots=st.integers(1, 4), ngl=st.integers(-1, 60), budget=st.integers(1, 8192),
       overhead=st.integers(0, 400))
def test_fit_always_fits_and_only_shrinks(n_layer, block, out, workers, ctx, slots, ngl, budget,
                                          overhead):
    m = synthetic(n_layer, block, out)
    args = dict(workers=workers, n_ctx=ctx, slots=slots, n_gpu_layers=ngl, n_batch=256,
                budget_mb=budget, cuda_overhead_mb=overhead)
    p = plan(m, fit=True, **args)
    assert p.fits
    assert p.workers <= workers and p.n_ctx <= ctx
    assert p.n_ctx >= min(ctx, 256)
    assert gpu.effective_gpu_layers(p.n_gpu_layers, n_layer) <= \
        gpu.effective_gpu_layers(ngl, n_layer)
    try:
        unfitted = plan(m, **args)
    except VramBudgetError:
        assert p.changes
    else:
        assert unfitted == p and not p.changes


# ---- the breach policy ----------------------------------------------------------------------

PIDS = {"w0": 100, "w1": 101, "w2": 102}


def test_within_budget_no_action():
    readings = {100: 300 * MiB, 101: 300 * MiB, 999: 4000 * MiB}    # 999 is not ours
    assert check(readings, 1024 * MiB, PIDS, "alert") == []
    assert check(readings, 1024 * MiB, PIDS, "restart_largest", n_layer=30) == []


def test_alert_only_logs():
    readings = {100: 400 * MiB, 101: 500 * MiB, 102: 200 * MiB}
    actions = check(readings, 1024 * MiB, PIDS, "alert")
    assert [a.kind for a in actions] == ["alert"]
    assert "1100.0 MiB is above the budget of 1024 MiB" in actions[0].message
    assert "w1 500.0" in actions[0].message


def test_restart_largest_names_the_largest_worker_with_fewer_layers():
    readings = {100: 400 * MiB, 101: 500 * MiB, 102: 200 * MiB}
    actions = check(readings, 1024 * MiB, PIDS, "restart_largest", gpu_layers=-1, n_layer=30,
                    bytes_per_layer=30 * MiB)
    assert [a.kind for a in actions] == ["alert", "restart"]
    r = actions[1]
    # 76 MiB over budget at 30 MiB per layer: 3 layers fewer than all 31
    assert (r.worker, r.pid, r.n_gpu_layers) == ("w1", 101, 28)
    # without a per-layer figure: half of the worker's current layers
    actions = check(readings, 1024 * MiB, PIDS, "restart_largest", gpu_layers={"w1": 20})
    assert actions[1] == Action("restart", actions[1].message, "w1", 101, 10)
    # all layers, but no model to say how many that is: alert, do not guess
    actions = check(readings, 1024 * MiB, PIDS, "restart_largest", gpu_layers=-1)
    assert [a.kind for a in actions] == ["alert", "alert"] and "unknown" in actions[1].message
    # nothing left to reduce
    actions = check(readings, 1024 * MiB, PIDS, "restart_largest", gpu_layers=0)
    assert [a.kind for a in actions] == ["alert", "alert"]


def test_dead_workers_count_nothing():
    readings = {100: 900 * MiB, 101: 900 * MiB}
    assert check(readings, 1024 * MiB, {"w0": 100, "w1": None}, "alert") == []


def test_monitor_samples_and_restarts_once(caplog):
    reader = FakeReader({100: 400 * MiB, 101: 500 * MiB, 102: 200 * MiB, 7: 50 * MiB},
                        total=2048 * MiB, name="Fake A2000")
    mon = GpuMonitor(GpuConfig(on_breach="restart_largest"), reader, n_gpu_layers=20)
    s = mon.sample(PIDS)
    assert s["device"] == "Fake A2000" and s["enforced"] is True
    assert s["workers"] == {"w0": 400.0, "w1": 500.0, "w2": 200.0}
    assert s["total_mib"] == 1100.0 and s["budget_mib"] == 1024.0 and s["breach"] is True
    assert s["device_used_mib"] == 1150.0 and s["device_total_mib"] == 2048.0
    with caplog.at_level(logging.WARNING, logger="llmctl.control.gpu"):
        first = mon.poll(PIDS)
        again = mon.poll(PIDS)                  # w1 not restarted yet: no second restart
    assert [a.kind for a in first] == ["alert", "restart"] and first[1].n_gpu_layers == 10
    assert [a.kind for a in again] == ["alert"]
    assert sum("above the budget" in r.message for r in caplog.records) == 1   # once per breach
    # w1 came back with a new pid and 10 layers, and is still too big: reduce it again
    reader.per_pid = {100: 400 * MiB, 201: 700 * MiB}
    pids = {"w0": 100, "w1": 201, "w2": None}
    third = mon.poll(pids)
    assert third[1].worker == "w1" and third[1].n_gpu_layers == 5
    reader.per_pid = {100: 400 * MiB}
    assert mon.poll({"w0": 100}) == [] and mon.last["breach"] is False


def test_monitor_without_gpu_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(gpu, "_SAID", set())
    with caplog.at_level(logging.INFO, logger="llmctl.control.gpu"):
        mon = GpuMonitor(GpuConfig(on_breach="restart_largest"), FakeReader(available=False))
        s = mon.sample(PIDS)
        assert mon.poll(PIDS) == []
        GpuMonitor(GpuConfig(), FakeReader(available=False))
    assert s["device"] == "cpu" and s["enforced"] is False and s["total_mib"] == 0.0
    assert s["workers"] == {"w0": 0.0, "w1": 0.0, "w2": 0.0}
    said = [r.message for r in caplog.records if gpu.NO_GPU_MESSAGE in r.message]
    assert said == [gpu.NO_GPU_MESSAGE]


# ---- NVML ---------------------------------------------------------------------------------------

def test_nvml_reader_on_this_machine_never_raises():
    r = NvmlReader()
    readings = (r.available(), r.device_name(), r.total_bytes(), r.used_bytes(), r.per_process())
    if not r.available():                   # this machine: no GPU, no NVML library
        assert readings == (False, "cpu", 0, 0, {}) and r.why
    r.close()
    r.close()


def fake_pynvml(fail_init: bool = False, fail_procs: bool = False) -> types.ModuleType:
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def procs(h):
        if fail_procs:
            raise NVMLError("GPU is lost")
        return [types.SimpleNamespace(pid=100, usedGpuMemory=300 * MiB),
                types.SimpleNamespace(pid=101, usedGpuMemory=None)]

    nv.NVMLError = NVMLError
    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetName = lambda h: b"Fake GPU" if h == 0 else "Fake GPU 2"
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=1024 * MiB, used=10 * MiB)
    nv.nvmlDeviceGetComputeRunningProcesses = procs
    return nv


def test_nvml_reader_with_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    r = NvmlReader()
    assert r.available() and r.device_name() == "Fake GPU, Fake GPU 2"
    assert r.total_bytes() == 2048 * MiB and r.used_bytes() == 20 * MiB
    assert r.per_process() == {100: 600 * MiB, 101: 0}     # summed over both devices


def test_nvml_reader_library_missing_or_gpu_lost(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    r = NvmlReader()
    assert not r.available() and "Not Found" in r.why and r.per_process() == {}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_procs=True))
    r = NvmlReader()
    assert r.available()
    assert r.per_process() == {} and not r.available() and "GPU is lost" in r.why
    monkeypatch.setitem(sys.modules, "pynvml", None)         # not installed
    r = NvmlReader()
    assert not r.available() and "not installed" in r.why


# ---- config and `llmctl check` ----------------------------------------------------------------

def test_gpu_config_follows_config_conventions():
    rows = [row for row in config_explain.reference(config.Config) if row[0] == "gpu"]
    assert [key for _, key, _, _ in rows] == [f.name for f in msgspec.structs.fields(GpuConfig)]
    for _, key, default, doc in rows:
        assert doc
        given_default = config.Config.from_json(json.dumps({"gpu": {key: default}}))
        assert getattr(given_default.gpu, key) == default
    for key, bad, fragment in [("on_breach", "reboot", "not one of alert, restart_largest"),
                               ("vram_budget_mb", 0, "out of range")]:
        with pytest.raises(config.ConfigError, match=f"\\[gpu\\] {key}: .*{fragment}"):
            config.Config.from_json(json.dumps({"gpu": {key: bad}}))
    g = GpuConfig()
    assert (g.vram_budget_mb, g.fit, g.on_breach, g.sample_interval_s) == \
        (1024, False, "alert", 2.0)
    with pytest.raises(AttributeError):
        g.fit = True  # type: ignore[misc]


@needs_model
def test_check_main_renders_the_plan():
    cfg = config.load(Path(__file__).parent.parent / "config.toml")
    # The hand-worked figures below are for one slot, whatever config.toml says.
    cfg = replace(cfg, workers=replace(cfg.workers, slots=1))
    text = gpu.check_main(cfg, reader=FakeReader(available=False))
    assert gpu.NO_GPU_MESSAGE in text
    assert "1 worker(s) x 303.3 MiB = 303.3 MiB vs vram_budget_mb 1024" in text and "fits" in text
    text = gpu.check_main(cfg, reader=FakeReader(name="Fake A2000"))
    assert "GPU: Fake A2000, 1,024 MiB" in text
    with pytest.raises(VramBudgetError, match="does not fit") as exc:
        gpu.check_main(cfg, GpuConfig(vram_budget_mb=200), reader=FakeReader(available=False))
    assert "47,185,920 B" in str(exc.value) and gpu.NO_GPU_MESSAGE in str(exc.value)
    fitted = gpu.check_main(cfg, GpuConfig(vram_budget_mb=262, fit=True), FakeReader())
    assert "fit = true changed: model.n_ctx 2048 -> 256" in fitted


def test_unreadable_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(gpu.ModelInfoError, match="not a readable GGUF"):
        read_model(bad)
    with pytest.raises(gpu.ModelInfoError, match="cannot read model"):
        read_model(tmp_path / "missing.gguf")


def test_monitor_warns_when_nvml_sees_none_of_the_worker_pids(caplog, monkeypatch):
    monkeypatch.setattr(gpu, "_SAID", set())
    mon = GpuMonitor(GpuConfig(), FakeReader({4242: 900 * MiB}))
    with caplog.at_level(logging.WARNING, logger="llmctl.control.gpu"):
        s = mon.sample(PIDS)
        mon.sample(PIDS)
    assert s["total_mib"] == 0.0 and s["device_used_mib"] == 900.0
    assert sum("none of the workers' pids" in r.message for r in caplog.records) == 1


@needs_model
def test_startup_plan_enforces_only_with_a_gpu(monkeypatch):
    monkeypatch.setattr(gpu, "_SAID", set())
    cfg = config.load(Path(__file__).parent.parent / "config.toml")
    # The hand-worked figures below are for one slot, whatever config.toml says.
    cfg = replace(cfg, workers=replace(cfg.workers, slots=1))
    small = GpuConfig(vram_budget_mb=200)
    assert gpu.startup_plan(cfg, small, FakeReader(available=False)) is None     # not enforced
    if not NvmlReader().available():                                             # this machine
        assert gpu.startup_plan(cfg, small) is None
    with pytest.raises(VramBudgetError):
        gpu.startup_plan(cfg, small, FakeReader())
    cpu = replace(cfg, model=replace(cfg.model, n_gpu_layers=0))
    assert gpu.startup_plan(cpu, small, FakeReader()) is None
    p = gpu.startup_plan(cfg, GpuConfig(vram_budget_mb=262, fit=True), FakeReader())
    assert p is not None and p.changes == ("model.n_ctx 2048 -> 256",)
