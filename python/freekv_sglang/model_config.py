"""What FreeKV reads from a model's (Hugging Face) config before any weight loads: whether it can
serve the model at all, its geometry and dtype, the bytes of one host page, and the CUDA
kernels' limits applied to it.

Called by the SGLang adapter's resolution hook (:mod:`freekv_sglang.sglang.args`) in the
launcher process, from a config object ``transformers.AutoConfig`` loaded; engine-agnostic.
"""

from __future__ import annotations

import math
from typing import Any

from freekv_sglang.kernel_limits import check_kernel_limits
from freekv_sglang.settings import FreeKVSettings, FreeKVStartupError

__all__ = [
    "MLA_MODEL_TYPES",
    "check_model_config",
    "check_model_kernel_limits",
    "host_page_bytes",
    "model_dtype",
    "model_geometry",
]


#: ``model_type`` values of multi-head latent attention (MLA) models. Their KV cache is one
#: compressed latent per token, not per-head keys and values, so FreeKV's per-head pages,
#: digests and recall do not apply.
MLA_MODEL_TYPES: tuple[str, ...] = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2")


def check_model_config(config: Any, model_path: str) -> None:
    """Refuse models FreeKV cannot serve, from their (HF) config alone; names the flag."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    if getattr(text, "kv_lora_rank", None) or model_type in MLA_MODEL_TYPES:
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support --model-path {model_path}: it uses multi-head "
            f"latent attention (model_type {model_type}); supported: models with multi-head or "
            "grouped-query attention (per-head keys and values)"
        )
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support --model-path {model_path}: "
            f"{heads} query heads are not a whole multiple of {kv_heads} KV heads"
        )


def model_geometry(config: Any) -> tuple[Any, Any, Any, Any]:
    """``(layers, query heads, KV heads, head dim)`` of the model with this (HF) config; an
    entry the config does not say is None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and isinstance(heads, int) and heads > 0:
        hidden = getattr(text, "hidden_size", None)
        head_dim = hidden // heads if isinstance(hidden, int) else None
    return layers, heads, kv_heads, head_dim


def model_dtype(config: Any, dtype: str | None) -> str | None:
    """The dtype SGLang runs the model in for ``--dtype`` (``auto``: the config's, float32 run
    as float16 or, for Gemma, bfloat16); None when the config does not say."""
    if dtype not in (None, "auto"):
        return str(dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    declared = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    if declared is None:
        return None
    name = str(declared).removeprefix("torch.")
    if name in ("float32", "float"):
        model_type = str(getattr(text, "model_type", "") or "")
        return "bfloat16" if model_type.startswith("gemma") else "float16"
    return name


def _whole(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def check_model_kernel_limits(
    config: Any, model_path: str, settings: FreeKVSettings, dtype: str | None
) -> None:
    """On a GPU: the model's dtype, head dim, GQA group size and layers, and the host pool's
    pages of ``--freekv-host-pool-gb``, against the CUDA kernels' table
    (:mod:`freekv_sglang.kernel_limits`)."""
    layers, heads, kv_heads, head_dim = (_whole(x) for x in model_geometry(config))
    host_pages = None
    page_bytes = host_page_bytes(config, settings.page_size, dtype)
    if settings.host_pool_gb is not None and page_bytes is not None:
        host_pages = int(settings.host_pool_gb * 2**30) // page_bytes
    check_kernel_limits(
        model=model_path,
        dtype=model_dtype(config, dtype),
        head_dim=head_dim,
        num_q_heads=heads,
        num_kv_heads=kv_heads,
        num_layers=layers,
        host_pages=host_pages,
        host_pool_gb=settings.host_pool_gb,
    )


def host_page_bytes(config: Any, page_size: int, dtype: str | None) -> int | None:
    """Bytes of one host page (every layer's K and V of ``page_size`` tokens) of the model
    with this (HF) config; ``dtype`` is ``--dtype`` (4-byte elements for float32, else 2).
    None when the config does not say."""
    layers, _heads, kv_heads, head_dim = model_geometry(config)
    dims = (layers, kv_heads, head_dim)
    if not all(isinstance(x, int) and x > 0 for x in dims):
        return None
    elem = 4 if dtype in ("float32", "float") else 2
    return math.prod(int(x) for x in dims if x is not None) * 2 * page_size * elem
