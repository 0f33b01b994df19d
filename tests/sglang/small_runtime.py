"""The small CPU :class:`~freekv_sglang.runtime.FreeKVRuntime` the runtime tests share:
2 layers, 4 query / 2 KV heads of 8 dims, 4 request rows of up to 256 tokens, float32, a real
Rust host pool with 2 conversion threads."""

from __future__ import annotations

import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime import FreeKVRuntime

LAYERS, HQ, H, D = 2, 4, 2, 8
MAX_REQUESTS, MAX_SEQ_LEN = 4, 256


def small_runtime(
    cfg: FreeKVConfig,
    host_pool_bytes: int = 4 << 20,
    max_sparse_requests: int | None = None,
    dense_store_tokens: int | None = None,
) -> FreeKVRuntime:
    return FreeKVRuntime(
        cfg,
        num_layers=LAYERS,
        num_q_heads=HQ,
        num_kv_heads=H,
        head_dim=D,
        max_requests=MAX_REQUESTS,
        max_seq_len=MAX_SEQ_LEN,
        dtype=torch.float32,
        device=torch.device("cpu"),
        host_pool_bytes=host_pool_bytes,
        conversion_threads=2,
        max_sparse_requests=max_sparse_requests,
        dense_store_tokens=dense_store_tokens,
    )
