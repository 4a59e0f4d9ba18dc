"""The no-GPU path end to end: the governor says so once and workers run on the CPU."""
from __future__ import annotations

import pytest

from tests.service import Service

pytestmark = pytest.mark.integration


def test_no_gpu_path_end_to_end(make_service):
    s: Service = make_service(gpu={"vram_budget_mb": 64})   # would not fit on a GPU
    check = s.llmctl("check")          # the plan for a GPU host: refused, arithmetic shown
    assert check.returncode == 1
    assert "KV cache  n_ctx 1024 x slots 1 x layers 30 x kv_heads 3 x head_dim 64" in check.stderr
    assert "VRAM budget not enforced" in check.stderr
    r = s.start()                                  # not refused: nothing to enforce on CPU
    assert r.returncode == 0, r.stderr
    st = s.status()
    assert st["gpu"]["device"] == "cpu" and st["gpu"]["enforced"] is False
    assert all(w["device"] == "cpu" and w["vram_mib"] is None for w in st["workers"])
    assert "device cpu (no NVIDIA GPU: VRAM budget not enforced)" in s.llmctl("status").stdout
    log = (s.dir / "run" / "logs" / "supervisor.log").read_text()
    assert log.count("no NVIDIA GPU found: running on CPU, VRAM budget not enforced") == 1
    worker_log = (s.dir / "run" / "logs" / "w0.log").read_text()
    assert "has no GPU offload" in worker_log       # n_gpu_layers=-1 on a CPU build: loud
    with s.client() as c:
        assert c.complete(1, prompt="Hi", max_tokens=3).done["completion_tokens"] == 3
