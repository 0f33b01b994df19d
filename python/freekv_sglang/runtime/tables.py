"""Token-level page tables of what a decode step attends (FlashInfer's page-table format).

Built on the scheduler thread once per decode batch (by
:class:`~freekv_sglang.runtime.paged_decode.FreeKVPagedDecode`) and read by every layer of the
step. Only small index arrays cross to the device and nothing comes back (the sizes are known
on the host), so building a table never syncs.

The attended tables of the requests over budget have shapes fixed by the geometry: every
request gets ``sink + window`` entries of capacity in the fixed table (its window's last page
may be partly filled, so fewer are meaningful) and exactly one region in the selected one.
With :class:`TableBuffers` they are written into buffers allocated once, so the decode step
that reads them (its attention, and a CUDA graph that recorded it) sees the same addresses
and shapes at every step of a batch size; only the host-side ``kv_indptr`` changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import PageTable

__all__ = ["AttendedTables", "TableBuffers", "attended_tables", "token_table"]


class AttendedTables(NamedTuple):
    """Token-level page tables (``kv_indptr`` / ``kv_indices`` / ``kv_last_page_len``, page
    size 1) of the requests over budget in one decode batch.

    ``fixed`` lists each request's sink and window token slots in the engine's KV pool;
    ``selected`` its budget slots (:class:`~freekv_sglang.runtime.regions.BudgetRegions`). Both
    hold for every sparse layer of the step: token slots and budget regions are per request,
    not per layer, and a budget slot of a request over budget always holds a page selected for
    its KV head (each head selects exactly as many pages as there are slots), so one table
    serves every head. ``kv_indptr`` and ``kv_last_page_len`` are on the CPU (what FlashInfer's
    planner reads; on the device they would cost a sync), ``kv_indices`` on the pool's device.
    """

    fixed: PageTable
    selected: PageTable


def token_table(
    rows: list[int], ranges: list[list[tuple[int, int]]], req_to_token: Tensor
) -> PageTable:
    """Token-level page table of request row ``rows[i]``'s positions ``[start, end)`` for each
    ``(start, end)`` of ``ranges[i]``, in order: their slots, gathered from ``req_to_token`` on
    its device."""
    dev = req_to_token.device
    seg_row: list[int] = []
    seg_start: list[int] = []
    seg_len: list[int] = []
    per_req: list[int] = []
    for r, spans in zip(rows, ranges, strict=True):
        n = 0
        for a, b in spans:
            if b < a:
                raise ValueError(f"row {r}: reversed range [{a}, {b})")
            seg_row.append(r)
            seg_start.append(a)
            seg_len.append(b - a)
            n += b - a
        per_req.append(n)
    indptr = torch.zeros(len(rows) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(per_req, dtype=torch.int64), 0)
    total = int(indptr[-1])
    meta = torch.tensor([seg_row, seg_start, seg_len], dtype=torch.int64).reshape(3, -1)
    meta = meta.to(dev, non_blocking=True)
    seg_ptr = torch.cumsum(meta[2], 0) - meta[2]  # first output position of each range
    seg = torch.repeat_interleave(
        torch.arange(meta.shape[1], device=dev), meta[2], output_size=total
    )
    pos = meta[1][seg] + torch.arange(total, device=dev) - seg_ptr[seg]
    indices = req_to_token[meta[0][seg], pos].to(torch.int32)
    return PageTable(indptr, indices, torch.ones(len(rows), dtype=torch.int32))


class TableBuffers:
    """Device ``kv_indices`` of the attended tables of up to ``max_requests`` requests over
    budget, allocated once (int32): ``fixed`` has ``fixed_width`` entries per request,
    ``selected`` ``region_size``. Written by :func:`attended_tables` on the scheduler thread,
    on the current stream, before the step that reads them is queued."""

    def __init__(
        self, cfg: FreeKVConfig, max_requests: int, region_size: int, device: torch.device
    ) -> None:
        self.max_requests = max_requests
        self.fixed_width = cfg.sink_tokens + cfg.num_window_pages * cfg.page_size
        self.region_size = region_size
        i32 = torch.int32
        self.fixed = torch.zeros(max_requests * self.fixed_width, dtype=i32, device=device)
        self.selected = torch.zeros(max_requests * region_size, dtype=i32, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.fixed, self.selected]


def attended_tables(
    cfg: FreeKVConfig,
    rows: list[int],
    seq_lens: list[int],
    req_to_token: Tensor,
    region_slots: Tensor,
    region_size: int,
    out: TableBuffers | None = None,
    inert: list[bool] | None = None,
) -> AttendedTables:
    """Tables of the attended tokens of ``rows`` (requests over budget, lengths including this
    step's token); ``region_slots`` are the rows' budget slots (``[len(rows) * region_size]``,
    CPU), in row order. Their ``kv_indices`` are views of ``out``'s buffers (new ones without
    it) of a capacity fixed by the batch size: ``B * (sink + window)`` entries in the fixed
    table, of which the first ``kv_indptr[-1]`` are meaningful (the rest are stale), and
    ``B * region_size`` in the selected one. An ``inert`` row (a padded or dense row of a
    batch of fixed size, whose output is not used) attends its position 0 only."""
    p = cfg.page_size
    b = len(rows)
    width = cfg.sink_tokens + cfg.num_window_pages * p
    if out is None:
        out = TableBuffers(cfg, b, region_size, req_to_token.device)
    elif b > out.max_requests or out.region_size != region_size or out.fixed_width != width:
        raise ValueError(
            f"{b} requests of region {region_size} do not fit table buffers of "
            f"{out.max_requests} requests of region {out.region_size}"
        )
    starts, counts = [], []
    for i, (r, n) in enumerate(zip(rows, seq_lens, strict=True)):
        if inert is not None and inert[i]:
            starts.append(0)
            counts.append(1)
            continue
        if n <= cfg.total_budget_tokens:
            raise ValueError(f"row {r}: {n} tokens fit the budget; it has no sparse table")
        win_start = max(-(-n // p) - cfg.num_window_pages, 0) * p
        starts.append(win_start)
        counts.append(cfg.sink_tokens + n - win_start)
    # Positions of each request's entries in a [B, width] grid, packed in request order (sink
    # then window); the unused tail of the capacity repeats entry 0 of the first request.
    m = torch.arange(width)
    sink = cfg.sink_tokens
    pos = torch.where(m < sink, m, torch.tensor(starts).unsqueeze(1) + (m - sink))  # [B, width]
    used = m < torch.tensor(counts).unsqueeze(1)
    grid_rows = torch.tensor(rows, dtype=torch.int64).unsqueeze(1).expand(b, width)
    packed = torch.zeros(2, b * width, dtype=torch.int64)
    total = sum(counts)
    packed[0, :total] = grid_rows[used]
    packed[1, :total] = pos[used]
    if total < b * width and total:
        packed[:, total:] = packed[:, :1]
    dev = req_to_token.device
    where = packed.to(dev, non_blocking=True)
    fixed_idx = out.fixed[: b * width]
    fixed_idx.copy_(req_to_token[where[0], where[1]])
    indptr = torch.zeros(b + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    last = torch.ones(b, dtype=torch.int32)
    fixed = PageTable(indptr, fixed_idx, last, width)
    sel_idx = out.selected[: b * region_size]
    sel_idx.copy_(region_slots.to(dev, torch.int32, non_blocking=True))
    sel_ptr = (torch.arange(b + 1) * region_size).to(torch.int32)
    return AttendedTables(fixed, PageTable(sel_ptr, sel_idx, last, region_size))
