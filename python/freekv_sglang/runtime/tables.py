"""Token-level page tables of what a decode step attends (FlashInfer's page-table format).

Built on the scheduler thread once per decode batch (by
:class:`~freekv_sglang.runtime.paged_decode.FreeKVPagedDecode`) and read by every layer of the
step. Only small index arrays cross to the device and nothing comes back (the sizes are known
on the host), so building a table never syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import PageTable

__all__ = ["AttendedTables", "attended_tables", "token_table"]


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


def attended_tables(
    cfg: FreeKVConfig,
    rows: list[int],
    seq_lens: list[int],
    req_to_token: Tensor,
    region_slots: Tensor,
    region_size: int,
) -> AttendedTables:
    """Tables of the attended tokens of ``rows`` (requests over budget, lengths including this
    step's token); ``region_slots`` are the rows' budget slots (``[len(rows) * region_size]``,
    CPU), in row order."""
    p = cfg.page_size
    ranges = []
    for r, n in zip(rows, seq_lens, strict=True):
        if n <= cfg.total_budget_tokens:
            raise ValueError(f"row {r}: {n} tokens fit the budget; it has no sparse table")
        win_start = max(-(-n // p) - cfg.num_window_pages, 0) * p
        ranges.append([(0, cfg.sink_tokens), (win_start, n)])
    fixed = token_table(rows, ranges, req_to_token)
    indptr = (torch.arange(len(rows) + 1) * region_size).to(torch.int32)
    selected = PageTable(
        indptr, region_slots.to(req_to_token.device, torch.int32), fixed.kv_last_page_len
    )
    return AttendedTables(fixed, selected)
