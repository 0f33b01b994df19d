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
    head_dim: int = D,
    dtype: torch.dtype = torch.float32,
    slots: int = 1024,
) -> FreeKVRuntime:
    """The shared runtime; ``head_dim``/``dtype`` other than the defaults put it at a geometry
    the CUDA kernels (and their emulated build) take, e.g. 64 dims in bfloat16. The engine's
    KV buffers (``slots`` token slots per layer, then the budget regions' rows, zeros) are
    the runtime's: :func:`engine_kv`."""
    regions = MAX_REQUESTS if max_sparse_requests is None else max_sparse_requests
    rows = slots + FreeKVRuntime.region_tokens(cfg, regions)
    k = [torch.zeros(rows, H, head_dim, dtype=dtype) for _ in range(LAYERS)]
    v = [torch.zeros(rows, H, head_dim, dtype=dtype) for _ in range(LAYERS)]
    return FreeKVRuntime(
        cfg,
        num_layers=LAYERS,
        num_q_heads=HQ,
        num_kv_heads=H,
        head_dim=head_dim,
        max_requests=MAX_REQUESTS,
        max_seq_len=MAX_SEQ_LEN,
        dtype=dtype,
        device=torch.device("cpu"),
        host_pool_bytes=host_pool_bytes,
        conversion_threads=2,
        kv_buffers=(k, v),
        region_first_slot=slots,
        max_sparse_requests=max_sparse_requests,
        dense_store_tokens=dense_store_tokens,
    )


def engine_kv(
    rt: FreeKVRuntime, g: torch.Generator | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The engine's K and V buffers of every layer (the ones the runtime's regions are rows
    of); with ``g``, its token slots are first filled with ``randn`` (keys of every layer, then
    values), in the buffers' dtype."""
    k, v = rt.regions.k_slots, rt.regions.v_slots
    if g is not None:
        n, shape = rt.regions.first, k[0].shape[1:]
        for t in (*k, *v):
            t[:n] = torch.randn(n, *shape, generator=g).to(t.dtype)
    return k, v


def masked_attention(
    rt: FreeKVRuntime,
    layer: int,
    q: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    pages: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch attention of ``q [B, H_q, D]`` over sink + window tokens (the engine's
    pool) and the budget slots whose page is selected for the KV head (``pages [B, H, K]``), in
    one float32 softmax: the reference the runtime's page-table attention is checked against."""
    cfg = rt.cfg
    p = cfg.page_size
    h, d = rt.num_kv_heads, rt.head_dim
    b = q.shape[0]
    dev = q.device
    lens = seq_lens.to(dev)
    rows = rows.to(dev)
    n_pages = (lens + p - 1) // p
    win_start = (n_pages - cfg.num_window_pages).clamp(min=0) * p
    win = cfg.num_window_pages * p
    sink_pos = torch.arange(cfg.sink_tokens, device=dev).expand(b, -1)
    win_pos = win_start.unsqueeze(1) + torch.arange(win, device=dev)
    win_ok = win_pos < lens.unsqueeze(1)
    pos = torch.cat((sink_pos, torch.where(win_ok, win_pos, 0)), dim=1)
    fixed_ok = torch.cat((torch.ones_like(sink_pos, dtype=torch.bool), win_ok), dim=1)
    tok = req_to_token[rows.unsqueeze(1), pos].to(torch.int64)
    size = rt.regions.size
    regs = rt.region_index([int(r) for r in rows.tolist()], dev)
    slot_idx = rt.regions.slot_tokens[regs, 0].unsqueeze(1) + torch.arange(size, device=dev)
    ks, vs = (t[slot_idx] for t in rt.slot_buffers(layer))
    s2p = rt.state.layers[layer].slot_to_page[regs]  # [B, H, S]
    used = (s2p.unsqueeze(-1) == pages.unsqueeze(2)).any(-1) & (s2p >= 0)
    slot_ok = used.repeat_interleave(p, dim=-1)
    k_all = torch.cat((k_cache[tok], ks), dim=1).permute(0, 2, 1, 3).float()
    v_all = torch.cat((v_cache[tok], vs), dim=1).permute(0, 2, 1, 3).float()
    ok = torch.cat((fixed_ok.unsqueeze(1).expand(-1, h, -1), slot_ok), dim=2)
    logits = torch.matmul(q.float().view(b, h, -1, d), k_all.transpose(2, 3)) * scale
    logits = logits.masked_fill(~ok.unsqueeze(2), float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), v_all).reshape(b, -1, d).to(q.dtype)


def sparse_step(
    rt: FreeKVRuntime,
    layer: int,
    q: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One FreeKV decode step of ``layer`` for ``rows`` (over budget), attended by
    :func:`masked_attention`: correction, attention over what the slots hold, speculation."""
    row_list = [int(r) for r in rows.tolist()]
    regs = rt.region_index(row_list, q.device)
    pages = rt.decode.correct(layer, q, regs, seq_lens, scale, row_list)
    out = masked_attention(
        rt, layer, q, rows, seq_lens, pages, k_cache, v_cache, req_to_token, scale
    )
    rt.decode.speculate(layer, q, regs, seq_lens, scale, row_list)
    return out
