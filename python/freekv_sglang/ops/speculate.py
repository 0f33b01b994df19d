"""The speculation's commit on the device: a decode step's speculative selection, its query
and the step's counters written into the speculation state of the requests' budget regions.

Who calls it: the decode step (`freekv_sglang.runtime.decode.SparseDecode.speculate`), once per
sparse layer and step, right after the speculative `freekv_sglang.ops.select_pages` of the
same layer, on the stream that ran it (the recall stream on a GPU, after it waited for the
forward stream: the correction's masks and counts it reads were written there). The state it
writes is read by the next step's `freekv_sglang.ops.correction_masks` of the layer, which the
forward stream queues after waiting for the recall stream's event. One launch replaces three
state scatters and the counters' arithmetic; it reads no device value on the host.

Inert rows (``live == 0``: the padding rows of a batch a CUDA graph holds, all in one scratch
region) write and count nothing, so the result does not depend on which of them would win a
race for that region.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops._checks import check_tensor
from freekv_sglang.ops._load import extension_for

__all__ = ["NUM_COUNTERS", "commit_speculation", "commit_speculation_reference", "step_counts"]

#: Counters per region (``freekv_sglang.state.COUNTER_NAMES``; the kernel's ``kNumCounters``).
NUM_COUNTERS = 7


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
    regs: Tensor,
    live: Tensor | None,
    next_lens: Tensor,
    q: Tensor,
    spec: Tensor,
    masks: Tensor,
    corr_counts: Tensor,
    spec_counts: Tensor,
    spec_pages: Tensor,
    spec_len: Tensor,
    q_prev: Tensor,
    counts: Tensor,
) -> None:
    """Reference of `commit_speculation`: inert rows write back what their region holds (so
    duplicate regions agree, with no data-dependent shape) and add zero."""
    total = step_counts(masks, corr_counts, spec_counts)
    if live is not None:
        keep = live != 0
        spec = torch.where(keep.view(-1, 1, 1), spec, spec_pages[regs])
        next_lens = torch.where(keep, next_lens, spec_len[regs])
        q = torch.where(keep.view(-1, 1, 1), q, q_prev[regs])
        total = total * keep.unsqueeze(1)
    spec_pages[regs] = spec
    spec_len[regs] = next_lens
    q_prev[regs] = q
    counts.index_add_(0, regs, total)


def commit_speculation(
    regs: Tensor,
    live: Tensor | None,
    next_lens: Tensor,
    q: Tensor,
    spec: Tensor,
    masks: Tensor,
    corr_counts: Tensor,
    spec_counts: Tensor,
    spec_pages: Tensor,
    spec_len: Tensor,
    q_prev: Tensor,
    counts: Tensor,
) -> None:
    """Write request ``b``'s speculative selection, its length and its query into region
    ``regs[b]``'s state and add the step's counters to it, in place.

    Args:
        regs: ``[B]`` int64 regions, in ``[0, R)``; live requests' regions are distinct.
        live: ``[B]`` int64, 0 for an inert row (writes and counts nothing), or ``None``.
        next_lens: ``[B]`` int64, the length the selection was made for (step t+1's).
        q: ``[B, H_q, D]`` the query that made it (dtype of ``q_prev``).
        spec: ``[B, H, K]`` int64 the speculative selection (`select_pages`' ``selected``).
        masks: ``[3, B, H]`` bool, `freekv_sglang.ops.correction_masks` of the same step.
        corr_counts, spec_counts: ``[B, H, 3]`` int64, the counts of the step's correction
            and speculative selections (`select_pages`' ``counts``; 0 where a head was masked).
        spec_pages, spec_len, q_prev, counts: the layer's state, ``[R, H, K]``, ``[R]``,
            ``[R, H_q, D]``, ``[R, 7]`` (`freekv_sglang.state.LayerState`).
    """
    if q.dim() != 3 or spec_pages.dim() != 3:
        raise ValueError(
            f"q [B, H_q, D] and spec_pages [R, H, K]: got {q.shape}, {spec_pages.shape}"
        )
    (b, h_q, d), (r, h, k) = q.shape, spec_pages.shape
    if h < 1 or h_q % h:
        raise ValueError(f"spec_pages.size(1) (KV heads, {h}) must divide q.size(1) ({h_q})")
    i64 = torch.int64
    check_tensor(spec_pages, "spec_pages", i64, (r, h, k), q)
    check_tensor(regs, "regs", i64, (b,), q)
    if live is not None:
        check_tensor(live, "live", i64, (b,), q)
    check_tensor(next_lens, "next_lens", i64, (b,), q)
    check_tensor(spec, "spec", i64, (b, h, k), q)
    check_tensor(masks, "masks", torch.bool, (3, b, h), q)
    check_tensor(corr_counts, "corr_counts", i64, (b, h, 3), q)
    check_tensor(spec_counts, "spec_counts", i64, (b, h, 3), q)
    check_tensor(spec_len, "spec_len", i64, (r,), q)
    check_tensor(q_prev, "q_prev", q.dtype, (r, h_q, d), q)
    check_tensor(counts, "counts", i64, (r, NUM_COUNTERS), q)
    ext = extension_for(regs, next_lens, q, spec, masks, spec_pages, counts)
    if ext is None:
        commit_speculation_reference(
            regs, live, next_lens, q, spec, masks, corr_counts, spec_counts,
            spec_pages, spec_len, q_prev, counts,
        )  # fmt: skip
        return
    ext.commit_speculation(
        regs, live, next_lens, q, spec, masks, corr_counts, spec_counts,
        spec_pages, spec_len, q_prev, counts,
    )  # fmt: skip
