"""KV cache element types and flash attention: the per-model keys, the rule llama.cpp
enforces, the memory plan counting the chosen types, and the worker passing them on."""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest

from llmctl.common import config
from llmctl.common.config import Config, ConfigError
from llmctl.control.gpu_estimate import CacheTypeError, ModelInfo, estimate
from llmctl.worker.kv_params import context_kv_params
from tests.service import MODEL

needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="model not fetched (make setup)")


def load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def test_defaults_are_f16_and_llama_cpps_auto():
    m = Config().model
    assert (m.cache_type_k, m.cache_type_v, m.flash_attn) == ("f16", "f16", "auto")


def test_model_keys_reach_the_served_entry_and_the_worker(tmp_path):
    cfg = load(tmp_path, '[model]\ncache_type_k = "q8_0"\ncache_type_v = "q4_0"\n'
                         'flash_attn = "on"\n')
    (e,) = cfg.served
    assert (e.cache_type_k, e.cache_type_v, e.flash_attn) == ("q8_0", "q4_0", "on")
    w = cfg.for_model(e).model
    assert (w.cache_type_k, w.cache_type_v, w.flash_attn) == ("q8_0", "q4_0", "on")


def test_each_models_entry_has_its_own_types(tmp_path):
    cfg = load(tmp_path, '[[models]]\nname = "a"\npath = "a.gguf"\ncache_type_k = "q8_0"\n'
                         'cache_type_v = "q8_0"\n[[models]]\nname = "b"\npath = "b.gguf"\n'
                         'flash_attn = "off"\n')
    a, b = cfg.served
    assert cfg.for_model(a).model.cache_type_v == "q8_0"
    assert (cfg.for_model(b).model.cache_type_v, cfg.for_model(b).model.flash_attn) == \
        ("f16", "off")


@pytest.mark.parametrize("key", ["cache_type_k", "cache_type_v", "flash_attn"])
def test_model_section_may_not_set_a_per_model_key_beside_models(tmp_path, key):
    value = '"auto"' if key == "flash_attn" else '"q8_0"'
    with pytest.raises(ConfigError, match=rf"\[model\] {key} is set per model"):
        load(tmp_path, f'[model]\n{key} = {value}\n[[models]]\nname = "a"\npath = "a.gguf"\n')


@pytest.mark.parametrize("v", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_quantized_v_without_flash_attention_is_refused(tmp_path, v):
    with pytest.raises(ConfigError, match=rf"cache_type_v = '{v}' with flash_attn = 'off'"):
        load(tmp_path, f'[model]\ncache_type_v = "{v}"\nflash_attn = "off"\n')


@pytest.mark.parametrize("k,v,fa", [("q8_0", "q8_0", "auto"), ("q4_0", "q8_0", "on"),
                                    ("q8_0", "f16", "off"), ("f32", "bf16", "off")])
def test_combinations_llama_cpp_accepts_load(tmp_path, k, v, fa):
    m = load(tmp_path, f'[model]\ncache_type_k = "{k}"\ncache_type_v = "{v}"\n'
                       f'flash_attn = "{fa}"\n').model
    assert (m.cache_type_k, m.cache_type_v, m.flash_attn) == (k, v, fa)


def _info(head_dim: int) -> ModelInfo:
    return ModelInfo(path="m.gguf", name="m", arch="llama", n_layer=2, n_embd=head_dim * 4,
                     n_head=4, n_head_kv=2, head_dim_k=head_dim, head_dim_v=head_dim,
                     n_vocab=100, block_bytes=(1000, 1000), output_bytes=500,
                     output_tensors=("output.weight",), tied_output=False, cpu_bytes=100,
                     file_bytes=3000)


def test_quantized_blocks_must_divide_the_head_size():
    assert estimate(_info(64), n_ctx=256, cache_type_k="q4_0", cache_type_v="q4_0").kv == \
        256 * 2 * (2 * 64 // 32 * 18) * 2
    with pytest.raises(CacheTypeError, match=r"cache_type_v = 'q8_0' stores blocks of 32 "
                                             r"values, which do not divide this model's head "
                                             r"size 80"):
        estimate(_info(80), n_ctx=256, cache_type_v="q8_0")
    assert estimate(_info(80), n_ctx=256, cache_type_k="bf16").kv == 256 * 2 * 2 * 80 * 2 * 2


def test_kv_term_scales_with_the_types():
    info = dataclasses.replace(_info(128), n_layer=16, block_bytes=(0,) * 16)
    f16 = estimate(info, n_ctx=8192).kv
    assert estimate(info, n_ctx=8192, cache_type_k="q8_0", cache_type_v="q8_0").kv * 64 == \
        f16 * 34
    assert estimate(info, n_ctx=8192, cache_type_k="q4_0", cache_type_v="q4_0").kv * 64 == \
        f16 * 18


def test_worker_sets_ggml_types_and_flash_attention():
    ll = types.SimpleNamespace(GGML_TYPE_F16=1, GGML_TYPE_Q8_0=8, GGML_TYPE_Q4_0=2,
                               LLAMA_FLASH_ATTN_TYPE_AUTO=-1, LLAMA_FLASH_ATTN_TYPE_DISABLED=0,
                               LLAMA_FLASH_ATTN_TYPE_ENABLED=1)
    cp = types.SimpleNamespace()
    context_kv_params(ll, "q8_0", "q4_0", "on")(cp)
    assert (cp.type_k, cp.type_v, cp.flash_attn_type) == (8, 2, 1)
    context_kv_params(ll, "f16", "f16", "auto")(cp)
    assert (cp.type_k, cp.type_v, cp.flash_attn_type) == (1, 1, -1)


@needs_model
def test_memory_plan_counts_the_chosen_types(tmp_path):
    from llmctl.control.models import memory_plan
    base = f'[control]\nrun_dir = "run"\n[model]\npath = "{MODEL}"\nn_ctx = 8192\n'
    f16, _, kind = memory_plan(load(tmp_path, base))
    q8, _, _ = memory_plan(load(tmp_path, base + 'cache_type_k = "q8_0"\ncache_type_v = "q8_0"\n'))
    assert kind == "ram"
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 x 2 (K, V) x 8192 cells: 180 MiB in f16
    kv_f16 = 8192 * 30 * 3 * 64 * 2 * 2 / 2**20
    assert f16["SmolLM2-135M-Instruct.Q4_1"] - q8["SmolLM2-135M-Instruct.Q4_1"] == \
        pytest.approx(kv_f16 * (1 - 34 / 64))


@needs_model
@pytest.mark.integration
def test_llama_cpp_applies_the_types_and_refuses_what_the_config_refuses():
    from llmctl.worker.batch import BatchEngine
    from llmctl.worker.engine import ModelLoadError

    def state_bytes(k: str, v: str) -> int:
        eng = BatchEngine(str(MODEL), 256, 0, 1, 63, slots=1, cache_type_k=k, cache_type_v=v)
        ll, ctx = eng._ll, eng._ctx.ctx
        toks = eng._model.tokenize(b"The capital of France is Paris. " * 4, True, False)
        arr = (ll.llama_token * len(toks))(*toks)
        batch = ll.llama_batch_get_one(arr, len(toks))
        assert ll.llama_decode(ctx, batch) == 0
        return ll.llama_state_seq_get_size(ctx, 0)

    f16, q8, q4 = state_bytes("f16", "f16"), state_bytes("q8_0", "q8_0"), state_bytes("q4_0", "q4_0")
    assert q4 < q8 < f16
    assert q8 / f16 == pytest.approx(34 / 64, rel=0.05)
    with pytest.raises(ModelLoadError, match="cannot create a context"):
        BatchEngine(str(MODEL), 256, 0, 1, 63, slots=1, cache_type_v="q8_0", flash_attn="off")


def test_measurement_reads_llama_cpp_and_the_plan_and_scores_agreement():
    from llmctl.tools import kv_cache_measure as km
    log = ("llama_kv_cache:        CPU KV buffer size =    23.91 MiB\n"
           "llama_kv_cache: K (q8_0):   11.95 MiB, V (q8_0):   11.95 MiB\n")
    assert [float(m) for m in km.KV_LINE.findall(log)] == [23.91]
    check = ("  KV cache  n_ctx 2048 x slots 1 x layers 30 x kv_heads 3 x head_dim 64 x 2 ...\n"
             "            =    25,067,520 B    23.9 MiB\n")
    assert km.PLAN_KV.search(check).group(1) == "25,067,520"
    # the same up to the 3rd token of the first prompt, identical second prompt
    assert km.agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 3, 9], [5, 6]]) == (5 / 6, 1)
    rows = km.summarise([
        {"type": "f16", "n_ctx": 2048, "rss_mib": 200.0, "kv_mib": 45.0, "plan_kv_mib": 45.0,
         "tok_s": 20.0, "tokens": [[1, 2]]},
        {"type": "q8_0", "n_ctx": 2048, "rss_mib": 179.0, "kv_mib": 23.91, "plan_kv_mib": 23.91,
         "tok_s": 21.0, "tokens": [[1, 3]]},
        {"type": "q4_0", "n_ctx": 2048, "error": "exit 1"}])
    assert (rows[1]["agreement"], rows[1]["identical_prompts"]) == (0.5, "0/1")
    assert (rows[1]["rss_vs_f16_mib"], rows[1]["plan_vs_f16_mib"]) == (-21.0, -21.1)
    assert "error: exit 1" in km.table(rows)
