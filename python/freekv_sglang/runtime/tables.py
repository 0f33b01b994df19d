"""Token-level page tables of what a decode step attends (FlashInfer's page-table format).

Built on the scheduler thread once per decode batch (by
:class:`~freekv_sglang.runtime.paged_decode.FreeKVPagedDecode` and
:class:`~freekv_sglang.runtime.graph_decode.GraphDecode`) and read by every layer of the step.
Only small index arrays cross to the device and nothing comes back (the sizes are known on
the host), so building a table never syncs.

The attended table of the requests over budget has shapes fixed by the geometry: every request
gets ``sink + window`` entries of capacity for its sink and window token slots (its window's
last page may be partly filled, so fewer are meaningful), followed by the slots of its budget
region. Both kinds are rows of the engine's KV buffers (the regions are their rows past the
allocator's: :mod:`~freekv_sglang.runtime.regions`), so one paged decode attends a sparse
request whole. With :class:`TableBuffers` the table is written into a buffer allocated once, so
the decode step that reads it (its attention, and a CUDA graph that recorded it) sees the same
address and shape at every step of a batch size; only the host-side ``kv_indptr`` changes.

The table holds for every sparse layer of the step: token slots and budget regions are per
request, not per layer, and a budget slot of a request over budget always holds a page
selected for its KV head (each head selects exactly as many pages as there are slots), so one
table serves every head. ``kv_indptr`` and ``kv_last_page_len`` are on the CPU (what
FlashInfer's planner reads; on the device they would cost a sync), ``kv_indices`` on the KV
buffers' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import PageTable

__all__ = ["TableBuffers", "attended_table", "pick_rows", "token_table"]


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
    """Device ``kv_indices`` of the attended table of up to ``max_requests`` requests over
    budget, allocated once (int32): ``width`` entries per request, ``fixed_width`` (sink +
    window) then ``region_size``. Written by :func:`attended_table` on the scheduler thread, on
    the current stream, before the step that reads it is queued."""

    def __init__(
        self, cfg: FreeKVConfig, max_requests: int, region_size: int, device: torch.device
    ) -> None:
        self.max_requests = max_requests
        self.fixed_width = cfg.sink_tokens + cfg.num_window_pages * cfg.page_size
        self.region_size = region_size
        self.width = self.fixed_width + region_size
        self.indices = torch.zeros(max_requests * self.width, dtype=torch.int32, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.indices]


def attended_table(
    cfg: FreeKVConfig,
    rows: list[int],
    seq_lens: list[int],
    req_to_token: Tensor,
    region_slots: Tensor,
    region_size: int,
    out: TableBuffers | None = None,
    inert: list[bool] | None = None,
) -> PageTable:
    """Table of the attended tokens of ``rows`` (requests over budget, lengths including this
    step's token): per request its sink and window token slots, then its budget slots
    (``region_slots``, ``[len(rows) * region_size]``, CPU, in row order). Its ``kv_indices`` is
    a view of ``out``'s buffer (a new one without it) of a capacity fixed by the batch size,
    ``B * (sink + window + region_size)`` entries, of which the first ``kv_indptr[-1]`` are
    meaningful (the rest are stale); ``max_kv_len`` is that width. An ``inert`` row (a padded
    or dense row of a batch of fixed size, whose output is not used) attends its position 0
    and its region."""
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
    if region_slots.shape != (b * region_size,):
        raise ValueError(
            f"region_slots must have {b * region_size} entries, got {region_slots.shape}"
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
    # Request i's entries start at indptr[i]: its sink then window positions (a [B, width]
    # grid, the used ones), then its region's slots.
    m = torch.arange(width)
    sink = cfg.sink_tokens
    n_fixed = torch.tensor(counts, dtype=torch.int64)
    pos = torch.where(m < sink, m, torch.tensor(starts).unsqueeze(1) + (m - sink))  # [B, width]
    used = m < n_fixed.unsqueeze(1)
    indptr = torch.zeros(b + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(n_fixed + region_size, 0)
    grid_rows = torch.tensor(rows, dtype=torch.int64).unsqueeze(1).expand(b, width)
    fixed_at = (indptr[:-1].unsqueeze(1) + m)[used]
    fixed_src = torch.stack((grid_rows[used], pos[used], fixed_at))
    sel_at = (indptr[:-1] + n_fixed).unsqueeze(1) + torch.arange(region_size)
    sel = torch.stack((sel_at.flatten(), region_slots.to(torch.int64)))
    dev = req_to_token.device
    fixed_src = fixed_src.to(dev, non_blocking=True)
    sel = sel.to(dev, non_blocking=True)
    idx = out.indices[: b * out.width]
    idx.index_copy_(0, fixed_src[2], req_to_token[fixed_src[0], fixed_src[1]].to(torch.int32))
    idx.index_copy_(0, sel[0], sel[1].to(torch.int32))
    last = torch.ones(b, dtype=torch.int32)
    return PageTable(indptr.to(torch.int32), idx, last, out.width)


def pick_rows(pick: list[bool], a: PageTable, b: PageTable, max_kv_len: int) -> PageTable:
    """Row ``i`` of ``a`` where ``pick[i]``, of ``b`` elsewhere: one table of both (both over
    the same rows; ``kv_indptr`` on the host). Gathered on the device of the indices, with a
    new ``kv_indices`` of exactly the entries; the result's rows are bounded by
    ``max_kv_len``."""
    rows = len(pick)
    if a.kv_indptr.shape != (rows + 1,) or b.kv_indptr.shape != (rows + 1,):
        raise ValueError(
            f"{rows} rows picked from tables of {a.kv_indptr.shape[0] - 1} and "
            f"{b.kv_indptr.shape[0] - 1}"
        )
    ptr_a, ptr_b = a.kv_indptr.to(torch.int64), b.kv_indptr.to(torch.int64)
    n_a = int(ptr_a[-1])
    take = torch.tensor(pick, dtype=torch.bool)
    counts = torch.where(take, ptr_a[1:] - ptr_a[:-1], ptr_b[1:] - ptr_b[:-1])
    if rows and int(counts.max()) > max_kv_len:
        raise ValueError(f"a picked row has {int(counts.max())} entries, over {max_kv_len}")
    src_start = torch.where(take, ptr_a[:-1], n_a + ptr_b[:-1])
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    total = int(indptr[-1])
    dev = a.kv_indices.device
    both = torch.cat((a.kv_indices[:n_a], b.kv_indices[: int(ptr_b[-1])]))
    meta = torch.stack((src_start, indptr[:-1], counts)).to(dev, non_blocking=True)
    seg = torch.repeat_interleave(torch.arange(rows, device=dev), meta[2], output_size=total)
    src = meta[0][seg] + torch.arange(total, device=dev) - meta[1][seg]
    last = torch.ones(rows, dtype=torch.int32)
    return PageTable(indptr.to(torch.int32), both[src], last, max_kv_len)
