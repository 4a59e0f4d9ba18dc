"""The KV cache's element types and flash attention of a llama context
(``[model] cache_type_k``, ``cache_type_v``, ``flash_attn``): set on the generating
context (``batch.py``) and the embedding one (``embed.py``) alike.
"""
from __future__ import annotations

from typing import Any


FLASH_ATTN = {"auto": "LLAMA_FLASH_ATTN_TYPE_AUTO", "on": "LLAMA_FLASH_ATTN_TYPE_ENABLED",
              "off": "LLAMA_FLASH_ATTN_TYPE_DISABLED"}


def context_kv_params(ll: Any, cache_type_k: str, cache_type_v: str, flash_attn: str) -> Any:
    """A function that sets the KV cache's element types ("f16", "q8_0", ...: ggml's type
    names) and flash attention on llama_context_params."""
    type_k = getattr(ll, f"GGML_TYPE_{cache_type_k.upper()}")
    type_v = getattr(ll, f"GGML_TYPE_{cache_type_v.upper()}")
    fa = getattr(ll, FLASH_ATTN[flash_attn])

    def apply(cp: Any) -> None:
        cp.type_k, cp.type_v, cp.flash_attn_type = type_k, type_v, fa
    return apply
