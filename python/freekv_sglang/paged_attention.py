"""Plain-torch references of the two FlashInfer operations the GPU decode path is built from.

The SGLang adapter's FlashInfer backend attends a request over budget in two parts: the sink and
window tokens, which stay in SGLang's KV pool, and the budget slots, which hold the recalled
pages; each part is one ``BatchDecodeWithPagedKVCacheWrapper`` run over a token-level page table
(page size 1, NHD), and ``flashinfer.merge_state`` joins the two partial results by their
log-sum-exp. This module states what those operations compute, on any device:

- `paged_decode_reference`: one query token per request against the cache entries its page
  table lists (``kv_indptr`` / ``kv_indices``), grouped-query heads, returning the output and
  the natural-log LSE of the logits;
- `merge_state_reference`: the softmax-weighted merge of two partial outputs.

The CPU tests check the adapter's page tables with them against its masked torch attention, and
``benchmarks/gpu_check.py`` checks FlashInfer's kernels against them on a GPU. (FlashInfer keeps
its LSE in base 2; only the merged output is compared.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_state_reference", "paged_decode_reference"]


def paged_decode_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indptr: Tensor,
    kv_indices: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Decode attention of ``q [B, H_q, D]`` over token-level page tables.

    ``k_cache``/``v_cache`` are ``[N, H, D]`` (NHD, page size 1); request ``b`` attends to
    the entries ``kv_indices[kv_indptr[b]:kv_indptr[b + 1]]``. Query head ``j`` reads KV head
    ``j // (H_q // H)``. Computed in float32.

    Returns ``(o [B, H_q, D] in q.dtype, lse [B, H_q] float32)``; a request with no entries
    gets a zero output and an LSE of ``-inf``.
    """
    b, h_q, d = q.shape
    h = k_cache.shape[1]
    if h_q % h:
        raise ValueError(f"{h_q} query heads are not a multiple of {h} KV heads")
    if kv_indptr.shape != (b + 1,):
        raise ValueError(f"kv_indptr must have shape ({b + 1},), got {tuple(kv_indptr.shape)}")
    ptr = kv_indptr.to(device=q.device, dtype=torch.int64)
    lens = ptr[1:] - ptr[:-1]
    if bool((lens < 0).any()):
        raise ValueError("kv_indptr must be non-decreasing")
    width = int(lens.max()) if b else 0
    pos = torch.arange(width, device=q.device)
    ok = pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, M]
    flat = torch.where(ok, ptr[:-1].unsqueeze(1) + pos, 0)
    idx = kv_indices.to(q.device, torch.int64)[flat] if kv_indices.numel() else flat
    idx = torch.where(ok, idx, 0)
    k = k_cache[idx].float().permute(0, 2, 1, 3)  # [B, H, M, D]
    v = v_cache[idx].float().permute(0, 2, 1, 3)
    qh = q.float().view(b, h, h_q // h, d)
    logits = torch.matmul(qh, k.transpose(2, 3)) * scale  # [B, H, G, M]
    logits = logits.masked_fill(~ok.view(b, 1, 1, width), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, G]
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.matmul(probs, v)  # [B, H, G, D]
    return out.reshape(b, h_q, d).to(q.dtype), lse.reshape(b, h_q)


def merge_state_reference(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint token sets from the parts' outputs and LSEs
    (``o [B, H_q, D]``, ``lse [B, H_q]``, natural log); computed in float32."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a.float() - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b.float() - safe).unsqueeze(-1)
    out = w_a * o_a.float() + w_b * o_b.float()
    return out.to(o_a.dtype), lse
