"""Plain-torch reference of the FlashInfer operation the GPU decode path is built from.

The SGLang adapter's FlashInfer backend attends a request over budget with one
``BatchDecodeWithPagedKVCacheWrapper`` run over a token-level page table (page size 1, NHD)
that lists its sink and window token slots and its budget slots, all rows of SGLang's KV pool.
This module states what that operation computes, on any device:
`paged_decode_reference`, one query token per request against the cache entries its page
table lists (``kv_indptr`` / ``kv_indices``), grouped-query heads, returning the output and
the natural-log LSE of the logits.

It also states the kernel set the adapter's page-table decode
(:mod:`freekv_sglang.runtime.paged_decode`) is written against, `DecodeKernels`, and implements
it with that reference (`ReferenceDecodeKernels`); the FlashInfer backend implements it with
FlashInfer's kernels.

The CPU tests check the adapter's page tables and its page-table decode with the reference
against its masked torch attention, and ``benchmarks/gpu_check.py`` checks FlashInfer's kernels
against it on a GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from freekv_sglang.ops.page_table import PageTable

__all__ = [
    "DecodeKernels",
    "PagedDecode",
    "ReferenceDecodeKernels",
    "paged_decode_reference",
]


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
    ok, flat = _gather_plan(kv_indptr, q.shape[0], None, q.device)
    return _attend(q, k_cache, v_cache, kv_indices, ok, flat, scale)


def _gather_plan(
    kv_indptr: Tensor, b: int, width: int | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Where request ``b``'s ``m``-th entry sits in ``kv_indices`` (``flat [B, M]``) and
    whether it exists (``ok [B, M]``), for ``M = width`` (default: the longest request).
    Computed where ``kv_indptr`` lives (the host, in serving), then moved to ``device``."""
    if kv_indptr.shape != (b + 1,):
        raise ValueError(f"kv_indptr must have shape ({b + 1},), got {tuple(kv_indptr.shape)}")
    ptr = kv_indptr.to(torch.int64)
    lens = ptr[1:] - ptr[:-1]
    if bool((lens < 0).any()):
        raise ValueError("kv_indptr must be non-decreasing")
    longest = int(lens.max()) if b else 0
    if width is None:
        width = longest
    elif longest > width:
        raise ValueError(f"a request has {longest} entries, over the table's bound {width}")
    pos = torch.arange(width, device=ptr.device)
    ok = pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, M]
    flat = torch.where(ok, ptr[:-1].unsqueeze(1) + pos, 0)
    return ok.to(device), flat.to(device)


def _attend(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indices: Tensor,
    ok: Tensor,
    flat: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """`paged_decode_reference` on a gather plan: fixed shapes, no value read on the host."""
    b, h_q, d = q.shape
    h = k_cache.shape[1]
    if h_q % h:
        raise ValueError(f"{h_q} query heads are not a multiple of {h} KV heads")
    width = ok.shape[1]
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


class PagedDecode(Protocol):
    """One batch decode over a token-level page table (page size 1, NHD), planned once and run
    for every layer of a step (FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``)."""

    def plan(self, table: PageTable, sm_scale: float, logit_cap: float) -> None:
        """Fix the batch for the following runs: request ``b`` attends to the cache entries
        ``table.kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`` (``kv_indptr`` on the host)."""
        ...

    def run(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        """Attention of ``q [B, H_q, D]`` over ``kv`` (``[N, H, D]`` keys and values)."""
        ...


class DecodeKernels(Protocol):
    """The attention kernels the adapter's page-table decode runs."""

    def paged(self) -> PagedDecode:
        """A new, unplanned paged decode."""
        ...

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        """Attention of one request's ``q [H_q, D]`` over all of ``k``/``v [N, H, D]``."""
        ...


class _ReferencePagedDecode:
    """The plan gathers where each request's entries sit (on the host, where ``kv_indptr``
    is); a run only reads device values, with shapes fixed by the plan (``max_kv_len`` when the
    table has it), into buffers kept while the batch size and bound stay the same."""

    def __init__(self) -> None:
        self._table: PageTable | None = None
        self._scale = 0.0
        self._ok: Tensor | None = None
        self._flat: Tensor | None = None

    def plan(self, table: PageTable, sm_scale: float, logit_cap: float) -> None:
        if logit_cap:
            raise ValueError("the reference decode has no logit soft cap")
        b = table.kv_indptr.shape[0] - 1
        ok, flat = _gather_plan(table.kv_indptr, b, table.max_kv_len, table.kv_indices.device)
        if self._ok is not None and self._flat is not None and self._ok.shape == ok.shape:
            self._ok.copy_(ok)
            self._flat.copy_(flat)
        else:
            self._ok, self._flat = ok, flat
        self._table, self._scale = table, sm_scale

    def run(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        if self._table is None or self._ok is None or self._flat is None:
            raise RuntimeError("run before plan")
        t = self._table
        return _attend(q, kv[0], kv[1], t.kv_indices, self._ok, self._flat, self._scale)[0]


class ReferenceDecodeKernels:
    """`DecodeKernels` computed by `paged_decode_reference` (any device, float32 inside; no
    logit soft cap)."""

    def paged(self) -> PagedDecode:
        return _ReferencePagedDecode()

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        if logit_cap:
            raise ValueError("the reference decode has no logit soft cap")
        n = k.shape[0]
        indptr = torch.tensor([0, n], dtype=torch.int32)
        indices = torch.arange(n, dtype=torch.int32, device=k.device)
        return paged_decode_reference(q.unsqueeze(0), k, v, indptr, indices, sm_scale)[0][0]
