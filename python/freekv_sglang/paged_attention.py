"""Plain-torch reference of the FlashInfer operations the GPU decode path is built from.

The SGLang adapter's FlashInfer backend attends a request over budget with one
``BatchDecodeWithPagedKVCacheWrapper`` run over a token-level page table (page size 1, NHD)
that lists its sink and window token slots and its budget slots, all rows of SGLang's KV pool.
This module states what that operation computes, on any device:
`paged_decode_reference`, one query token per request against the cache entries its page
table lists (``kv_indptr`` / ``kv_indices``), grouped-query heads, returning the output and
the natural-log LSE of the logits; and `merge_state_reference`, the attention over two
disjoint sets of entries from the two parts' outputs and LSEs (``flashinfer.merge_state``).
The merge is used only by the dense layers of a decode in fixed form (a CUDA graph's), for
rows whose reclaimed pages sit in the dense-layer store, a buffer apart from SGLang's pool.

It also states the kernel set the adapter's page-table decode
(:mod:`freekv_sglang.runtime.paged_decode`, :mod:`freekv_sglang.runtime.graph_decode`) is
written against, `DecodeKernels`, and implements it with those references
(`ReferenceDecodeKernels`); the FlashInfer backend implements it with FlashInfer's kernels.

A decode in *fixed form* (`FixedTable`) is the one a CUDA graph holds: its batch size is fixed,
its table entries are copied by each plan into buffers it owns (whose addresses never change),
and its runs read nothing else of the table. `check_fixed_table` is the contract of such a plan,
checked by every implementation before it writes a buffer.

The CPU tests check the adapter's page tables and its page-table decode with the references
against its masked torch attention, and ``benchmarks/gpu_check.py`` checks FlashInfer's kernels
against them on a GPU. (FlashInfer keeps its LSE in base 2, these references in base e: an LSE
is only ever passed to the ``merge`` of the kernel set that made it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from freekv_sglang.ops.page_table import PageTable

__all__ = [
    "DecodeKernels",
    "EntryBuffers",
    "FixedTable",
    "PagedDecode",
    "ReferenceDecodeKernels",
    "check_fixed_table",
    "merge_state_reference",
    "paged_decode_reference",
]


@dataclass(frozen=True)
class FixedTable:
    """The fixed form of a paged decode (what a CUDA graph holds): every plan is of ``rows``
    requests with at most ``entries`` table entries in all and a ``max_kv_len`` bound on the
    table. Decodes of the same ``share`` are never planned for one step together (one per
    batch size), so an implementation may give them one entry buffer."""

    rows: int
    entries: int
    share: str

    def __post_init__(self) -> None:
        if self.rows < 1 or self.entries < self.rows:
            raise ValueError(
                f"a fixed table needs at least one row and an entry per row: {self.rows} rows, "
                f"{self.entries} entries"
            )


def check_fixed_table(table: PageTable, fixed: FixedTable) -> int:
    """Refuse a table that a decode in the fixed form ``fixed`` cannot hold (named numbers);
    returns its entry count. ``kv_indptr`` is read on the host (where the runtime builds it)."""
    rows = table.kv_indptr.shape[0] - 1
    if rows != fixed.rows:
        raise ValueError(f"fixed table {fixed.share!r}: {rows} rows planned, {fixed.rows} fixed")
    if table.max_kv_len is None:
        raise ValueError(
            f"fixed table {fixed.share!r}: the table has no max_kv_len (a fixed form needs a "
            "bound on every request's entries)"
        )
    if table.kv_last_page_len.shape != (rows,):
        raise ValueError(
            f"fixed table {fixed.share!r}: kv_last_page_len has shape "
            f"{tuple(table.kv_last_page_len.shape)}, expected ({rows},)"
        )
    n = int(table.kv_indptr[-1])
    if n > fixed.entries:
        raise ValueError(f"fixed table {fixed.share!r}: {n} entries, over its {fixed.entries}")
    if n > table.kv_indices.shape[0]:
        raise ValueError(
            f"fixed table {fixed.share!r}: kv_indptr ends at {n}, kv_indices has "
            f"{table.kv_indices.shape[0]}"
        )
    return n


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


def merge_state_reference(
    o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint entry sets from the parts' outputs and LSEs
    (``o [B, H_q, D]``, ``lse [B, H_q]``, natural log); computed in float32. A part without
    entries (LSE ``-inf``) adds nothing."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a.float() - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b.float() - safe).unsqueeze(-1)
    out = w_a * o_a.float() + w_b * o_b.float()
    return out.to(o_a.dtype), lse


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

    def run_with_lse(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """`run` plus each query head's log-sum-exp of its logits, ``[B, H_q]`` float32 (in the
        kernel set's own base: only its `DecodeKernels.merge` reads it)."""
        ...

    def buffers(self) -> list[Tensor]:
        """The device tensors its runs read besides ``q`` and ``kv``, as planned (the fixed
        form's are the same from plan to plan: what a CUDA graph holds)."""
        ...


class DecodeKernels(Protocol):
    """The attention kernels the adapter's page-table decode runs."""

    def paged(self, fixed: FixedTable | None = None) -> PagedDecode:
        """A new, unplanned paged decode; with ``fixed``, in that fixed form (each plan checked
        by `check_fixed_table`; its runs can be captured in a CUDA graph)."""
        ...

    def merge(self, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
        """Attention over the union of two disjoint entry sets from the parts'
        `PagedDecode.run_with_lse` results."""
        ...

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        """Attention of one request's ``q [H_q, D]`` over all of ``k``/``v [N, H, D]``."""
        ...


class EntryBuffers:
    """The ``kv_indices`` buffers of a kernel set's fixed-form decodes, one per ``share``
    (int32, allocated at its first decode; the decodes of a share bound the same entries)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, fixed: FixedTable, device: torch.device) -> Tensor:
        buf = self._bufs.get(fixed.share)
        if buf is None:
            buf = self._bufs[fixed.share] = torch.zeros(
                fixed.entries, dtype=torch.int32, device=device
            )
        elif buf.shape[0] != fixed.entries:
            raise ValueError(
                f"fixed table {fixed.share!r}: {fixed.entries} entries, its buffer has "
                f"{buf.shape[0]}"
            )
        return buf


class _ReferencePagedDecode:
    """The plan gathers where each request's entries sit (on the host, where ``kv_indptr``
    is); a run only reads device values, with shapes fixed by the plan (``max_kv_len`` when the
    table has it), into buffers kept while the batch size and bound stay the same. In the fixed
    form the plan also copies the table's entries into a buffer of its own."""

    def __init__(self, fixed: FixedTable | None = None, entries: EntryBuffers | None = None):
        self._fixed = fixed
        self._entries = entries if entries is not None else EntryBuffers()
        self._table: PageTable | None = None
        self._scale = 0.0
        self._ok: Tensor | None = None
        self._flat: Tensor | None = None

    def plan(self, table: PageTable, sm_scale: float, logit_cap: float) -> None:
        if logit_cap:
            raise ValueError("the reference decode has no logit soft cap")
        b = table.kv_indptr.shape[0] - 1
        dev = table.kv_indices.device
        if self._fixed is not None:
            n = check_fixed_table(table, self._fixed)
            buf = self._entries.get(self._fixed, dev)
            buf[:n].copy_(table.kv_indices[:n], non_blocking=True)
            table = table._replace(kv_indices=buf)
        ok, flat = _gather_plan(table.kv_indptr, b, table.max_kv_len, dev)
        if self._ok is not None and self._flat is not None and self._ok.shape == ok.shape:
            self._ok.copy_(ok)
            self._flat.copy_(flat)
        else:
            self._ok, self._flat = ok, flat
        self._table, self._scale = table, sm_scale

    def run_with_lse(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if self._table is None or self._ok is None or self._flat is None:
            raise RuntimeError("run before plan")
        t = self._table
        return _attend(q, kv[0], kv[1], t.kv_indices, self._ok, self._flat, self._scale)

    def run(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        return self.run_with_lse(q, kv)[0]

    def buffers(self) -> list[Tensor]:
        if self._table is None or self._ok is None or self._flat is None:
            return []
        return [self._table.kv_indices, self._ok, self._flat]


class ReferenceDecodeKernels:
    """`DecodeKernels` computed by `paged_decode_reference` and `merge_state_reference` (any
    device, float32 inside; no logit soft cap)."""

    def __init__(self) -> None:
        self._entries = EntryBuffers()

    def paged(self, fixed: FixedTable | None = None) -> PagedDecode:
        return _ReferencePagedDecode(fixed, self._entries)

    def merge(self, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
        return merge_state_reference(o_a, lse_a, o_b, lse_b)[0]

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        if logit_cap:
            raise ValueError("the reference decode has no logit soft cap")
        n = k.shape[0]
        indptr = torch.tensor([0, n], dtype=torch.int32)
        indices = torch.arange(n, dtype=torch.int32, device=k.device)
        return paged_decode_reference(q.unsqueeze(0), k, v, indptr, indices, sm_scale)[0][0]
