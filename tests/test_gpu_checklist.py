"""tools/gpu_checklist.py: its pure parts on the CPU, and its refusal without a GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmctl.common import config
from llmctl.tools import gpu_checklist as gc

LOAD_LOG = """\
load_tensors: offloading output layer to GPU
load_tensors: offloading 30 repeating layers to GPU
load_tensors: offloaded 31/31 layers to GPU
load_tensors:        CUDA0 model buffer size =    92.10 MiB
load_tensors:   CPU_Mapped model buffer size =    28.69 MiB
llama_kv_cache:      CUDA0 KV buffer size =    45.00 MiB
llama_context:      CUDA0 compute buffer size =    16.25 MiB
llama_context:  CUDA_Host compute buffer size =     1.27 MiB
"""


def test_offload_log_is_read():
    out = gc.parse_offload(LOAD_LOG)
    assert (out["offloaded"], out["layers"], out["all_on_gpu"]) == (31, 31, True)
    assert out["buffers_mib"] == {"CUDA0 model": 92.1, "CPU_Mapped model": 28.69,
                                  "CUDA0 KV": 45.0, "CUDA0 compute": 16.25,
                                  "CUDA_Host compute": 1.27}
    partial = gc.parse_offload("load_tensors: offloaded 10/31 layers to GPU\n")
    assert (partial["offloaded"], partial["all_on_gpu"]) == (10, False)
    assert gc.parse_offload("")["all_on_gpu"] is False


def test_plan_total_is_read_from_check():
    text = "  total     per worker = 318,080,256 B    303.3 MiB\n"
    assert gc.plan_mib(text) == 303.3
    assert gc.plan_mib("nothing") is None


def test_error_and_recalibration():
    ok = gc.compare(310.0, 303.3, 150)
    assert ok["error_pct"] == pytest.approx(-2.2) and ok["recalibrate"] is False
    off = gc.compare(420.0, 303.3, 150)
    assert off["error_pct"] == pytest.approx(-27.8) and off["recalibrate"] is True
    assert off["suggested_cuda_overhead_mb"] == 267        # 150 + 420 - 303.3
    over = gc.compare(200.0, 303.3, 150)
    assert over["recalibrate"] and over["suggested_cuda_overhead_mb"] == 47
    assert gc.compare(0.0, 303.3, 150)["error_pct"] is None


def test_config_text_is_a_valid_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(gc.config_text("m.gguf", str(tmp_path / "run"), workers=4, slots=8,
                                n_ctx=8192, budget_mb=1024, cache_type="q8_0",
                                on_breach="restart_largest", cuda_overhead_mb=0,
                                compute_buffer_mb=0))
    cfg = config.load(p)
    assert (cfg.workers.count, cfg.workers.slots, cfg.model.n_ctx) == (4, 8, 8192)
    assert (cfg.model.cache_type_k, cfg.model.cache_type_v) == ("q8_0", "q8_0")
    assert (cfg.gpu.vram_budget_mb, cfg.gpu.on_breach, cfg.gpu.cuda_overhead_mb) == \
        (1024, "restart_largest", 0)
    assert cfg.gateway.port == 0 and cfg.model.n_gpu_layers == -1


def test_refuses_clearly_without_a_gpu(tmp_path):
    if gc.no_gpu_reason() is None:
        pytest.skip("this host has a GPU")
    out = tmp_path / "g.json"
    r = subprocess.run([sys.executable, "-m", "llmctl.tools.gpu_checklist", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "gpu_checklist: refused: " in r.stderr and "nothing to do here" in r.stderr
    assert set(json.loads(out.read_text())) == {"refused"}
