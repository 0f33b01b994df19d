"""The speculation's commit: a decode step's speculative selection, its query and the step's
counters written into the speculation state of the requests' budget regions.

It has no op of its own: the speculative `freekv_sglang.ops.select_pages` of a sparse layer
takes a `SpeculationCommit` and its select kernel does it in its tail (one block per
(request, KV head): ``cuda/include/freekv/speculate.cuh``), on the stream that runs the
selection (the recall stream on a GPU, after it waited for the forward stream: the
correction's masks and counts it reads were written there). What it writes is read by the next
step's `freekv_sglang.ops.correction_masks` of the layer, which the forward stream queues after
waiting for the recall stream's event. This module holds its arguments, their checks (the
reference path and the launcher refuse the same inputs) and its reference.

Inert rows (``live == 0``: the padding rows of a batch a CUDA graph holds, all in one scratch
region) write and count nothing, so the result does not depend on which of them would win a
race for that region.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.ops._checks import check_tensor

__all__ = ["NUM_COUNTERS", "SpeculationCommit", "commit_speculation_reference", "step_counts"]

#: Counters per region (``freekv_sglang.state.COUNTER_NAMES``; the kernel's ``kNumCounters``).
NUM_COUNTERS = 7


class SpeculationCommit(NamedTuple):
    """What the speculative selection commits to, besides its own outputs (``B`` requests,
    ``R`` regions, ``H`` KV heads, ``K`` selected pages).

    Attributes:
        live: ``[B]`` int64, 0 for an inert row (writes and counts nothing), or ``None``.
        masks: ``[3, B, H]`` bool, `freekv_sglang.ops.correction_masks` of the same step.
        corr_counts: ``[B, H, 3]`` int64, the counts of the step's correction selection
            (`select_pages`' ``counts``; 0 where a head was not re-selected).
        spec_pages, spec_len, q_prev, counts: the layer's state, ``[R, H, K]``, ``[R]``,
            ``[R, H_q, D]`` (the query's dtype), ``[R, 7]`` (`freekv_sglang.state.LayerState`),
            updated in place at the selection's regions.
    """

    live: Tensor | None
    masks: Tensor
    corr_counts: Tensor
    spec_pages: Tensor
    spec_len: Tensor
    q_prev: Tensor
    counts: Tensor

    def check(self, q: Tensor, top_k: int, head_mask: Tensor | None, regions: int) -> None:
        """The launcher's checks, for a selection of ``q [B, H_q, D]`` with ``top_k`` pages
        over ``regions`` budget regions (the rows of the residency stores)."""
        if head_mask is not None:
            raise ValueError("a commit needs every head selected: head_mask must be None")
        b, h_q, d = q.shape
        r, h = regions, self.masks.shape[-1]
        i64 = torch.int64
        check_tensor(self.masks, "masks", torch.bool, (3, b, h), q)
        check_tensor(self.corr_counts, "corr_counts", i64, (b, h, 3), q)
        check_tensor(self.spec_pages, "spec_pages", i64, (r, h, top_k), q)
        check_tensor(self.spec_len, "spec_len", i64, (r,), q)
        check_tensor(self.q_prev, "q_prev", q.dtype, (r, h_q, d), q)
        check_tensor(self.counts, "counts", i64, (r, NUM_COUNTERS), q)
        if self.live is not None:
            check_tensor(self.live, "live", i64, (b,), q)

    def tensors(self) -> list[Tensor]:
        """What the launcher takes as ``commit`` (``live`` apart)."""
        return [self.masks, self.corr_counts, self.spec_pages, self.spec_len, self.q_prev,
                self.counts]  # fmt: skip


def step_counts(masks: Tensor, corr_counts: Tensor, spec_counts: Tensor) -> Tensor:
    """Per request ``[B, 7]`` int64, what a speculative step adds to its region's counters:
    steps 1, checks ``sum(have_spec)``, corrections ``sum(corrected)``, selections
    ``sum(redo) + H``, then hits, recalled, selected of both selections (sums over heads)."""
    b, h = masks.shape[1], masks.shape[2]
    heads = masks.sum(-1).T  # [B, 3]
    sel = corr_counts.sum(1) + spec_counts.sum(1)  # [B, 3]
    step = torch.ones(b, 1, dtype=torch.int64, device=masks.device)
    return torch.cat((step, heads[:, :2], heads[:, 2:] + h, sel), dim=1)


def commit_speculation_reference(
    commit: SpeculationCommit, regs: Tensor, next_lens: Tensor, q: Tensor, spec: Tensor,
    spec_counts: Tensor,
) -> None:  # fmt: skip
    """Reference of the commit of the speculative selection ``spec [B, H, K]`` (made for
    ``next_lens [B]`` with ``q``, in regions ``regs [B]``; its counts ``spec_counts``): inert
    rows write back what their region holds (so duplicate regions agree, with no data-dependent
    shape) and add zero."""
    c = commit
    total = step_counts(c.masks, c.corr_counts, spec_counts)
    if c.live is not None:
        keep = c.live != 0
        spec = torch.where(keep.view(-1, 1, 1), spec, c.spec_pages[regs])
        next_lens = torch.where(keep, next_lens, c.spec_len[regs])
        q = torch.where(keep.view(-1, 1, 1), q, c.q_prev[regs])
        total = total * keep.unsqueeze(1)
    c.spec_pages[regs] = spec
    c.spec_len[regs] = next_lens
    c.q_prev[regs] = q
    c.counts.index_add_(0, regs, total)
