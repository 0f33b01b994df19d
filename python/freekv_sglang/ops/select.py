"""Page selection on the device: Quest scores over a ragged batch, GQA reduction, per-KV-head
top-k, delta against the resident set and the recall work list, with no host round trip.

Who calls it: the engine, once per decode step and sparse layer, on the stream that produced
the query (for speculative retrieval: right after the layer's attention at step t, with the
lengths of step t+1; for correction: with ``head_mask`` = the correction flags). It updates the
residency stores in place and writes the recall work list ``work``, which
`freekv_sglang.ops.recall.recall_direct` consumes on the same stream (the work list contract
is defined once, in the `freekv_sglang.ops.recall` module docstring). Nothing here reads a
device value on the host.

Semantics are those of `freekv_sglang.retrieval` (`select_pages` then `compute_delta`), on the
engine's store layouts instead of batch-gathered tensors: digests per host pool page
(``[N, 2, H, D]``), residency per budget region (``rows`` index the regions); see
``cuda/include/freekv/select.cuh`` for the layouts and the exact tie rules. A candidate page
whose host page is ``< 0`` or ``>= N`` has no digest and is not selectable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.ops._load import extension_for
from freekv_sglang.ops.rerank import Rerank, rerank_scores_reference
from freekv_sglang.ops.speculate import SpeculationCommit, commit_speculation_reference

__all__ = [
    "REDUCTIONS",
    "SelectOutputs",
    "compute_delta_reference",
    "select_pages",
    "select_pages_reference",
]

REDUCTIONS = {"softmax_mean": 0, "mean": 1, "max": 2}
_NEG = float("-inf")


class SelectOutputs(NamedTuple):
    """Outputs of `select_pages` (``B`` requests, ``H`` KV heads, ``H_q`` query heads, ``P``
    pages per region, ``K`` selected, ``S`` slots).

    Attributes:
        selected: ``[B, H, K]`` int64 pages best first, ``-1`` padded.
        page_scores: ``[B, H, P]`` float32 reduced scores, ``-inf`` where not selectable.
        recall: ``[B, H, S]`` int64 page copied into each slot, ``-1`` = keep.
        counts: ``[B, H, 3]`` int64 hits, recalled, selected (the page miss rate's inputs).
        work: ``[B * H * S, 4]`` int32 recall work list, one row per (request, KV head, budget
            slot) at ``(b * H + h) * S + s``, ``-1`` where the slot keeps its page (the
            contract: `freekv_sglang.ops.recall`).
        raw: ``[B, H_q, P]`` float32 Quest scores (workspace; meaningful at the selectable
            candidates of the heads ``head_mask`` flags only: the kernels score no other);
            with re-ranking, the re-ranked candidates' best logits there instead.
    """

    selected: Tensor
    page_scores: Tensor
    recall: Tensor
    counts: Tensor
    work: Tensor
    raw: Tensor

    @staticmethod
    def allocate(
        b: int, h_q: int, h: int, p: int, k: int, s: int, device: torch.device | str
    ) -> SelectOutputs:
        i64, f32, i32 = torch.int64, torch.float32, torch.int32
        return SelectOutputs(
            selected=torch.empty(b, h, k, dtype=i64, device=device),
            page_scores=torch.empty(b, h, p, dtype=f32, device=device),
            recall=torch.empty(b, h, s, dtype=i64, device=device),
            counts=torch.empty(b, h, 3, dtype=i64, device=device),
            work=torch.empty(b * h * s, 4, dtype=i32, device=device),
            raw=torch.empty(b, h_q, p, dtype=f32, device=device),
        )


def compute_delta_reference(
    selected: Tensor, page_scores: Tensor, slot_to_page: Tensor, page_to_slot: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel's delta rule on batch-gathered tensors.

    Selected pages already resident keep their slot. Missing pages, best first, take victim
    slots in ascending ``(slot score, slot index)`` order, where a slot kept for a selected
    page scores ``+inf``, an empty slot ``-inf`` and any other slot its page's score.

    Returns:
        ``(slot_to_page, page_to_slot, recall, counts)`` after the delta; ``counts`` is
        ``[B, H, 3]`` (hits, recalled, selected).
    """
    b, h, s = slot_to_page.shape
    n_p = page_to_slot.shape[-1]
    valid = selected >= 0
    sel0 = selected.clamp(min=0)
    cur = page_to_slot.gather(-1, sel0)
    hit = valid & (cur >= 0)
    keep = torch.zeros(b, h, s + 1, dtype=torch.bool, device=selected.device)
    keep.scatter_(-1, torch.where(hit, cur, s), True)
    keep = keep[..., :s]
    occ = slot_to_page >= 0
    slot_score = page_scores.gather(-1, slot_to_page.clamp(min=0))
    key = torch.where(keep, float("inf"), torch.where(occ, slot_score, _NEG))
    victims = torch.argsort(key, dim=-1, stable=True)
    need = valid & ~hit
    rank = (torch.cumsum(need.to(torch.int64), dim=-1) - 1).clamp(min=0)
    target = victims.gather(-1, rank)
    tgt = torch.where(need, target, s)
    pad = slot_to_page.new_full((b, h, 1), -1)
    new_s2p = torch.cat((slot_to_page, pad), dim=-1)
    evicted = new_s2p.gather(-1, tgt)
    new_s2p.scatter_(-1, tgt, selected)
    recall = slot_to_page.new_full((b, h, s + 1), -1)
    recall.scatter_(-1, tgt, selected)
    new_p2s = torch.cat((page_to_slot, pad), dim=-1)
    new_p2s.scatter_(-1, torch.where(need & (evicted >= 0), evicted, n_p), -1)
    new_p2s.scatter_(-1, torch.where(need, selected, n_p), tgt)
    counts = torch.stack((hit.sum(-1), need.sum(-1), valid.sum(-1)), dim=-1)
    return new_s2p[..., :s], new_p2s[..., :n_p], recall[..., :s], counts


def _check_common(
    q: Tensor,
    digests: Tensor,
    top_k: int,
    slot_to_page: Tensor,
    page_to_slot: Tensor,
    host_pages: Tensor,
    reduction: str,
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if q.dim() != 3 or digests.dim() != 4:
        raise ValueError(
            f"q must be [B, H_q, D] and digests [N, 2, H, D], got {tuple(q.shape)} and "
            f"{tuple(digests.shape)}"
        )
    if host_pages.dim() != 2:
        raise ValueError(f"host_pages must be [R, P], got {tuple(host_pages.shape)}")
    if page_to_slot.shape[-1] != host_pages.shape[1]:
        raise ValueError(
            f"page_to_slot.shape[-1] ({page_to_slot.shape[-1]}) must equal host_pages.shape[1] "
            f"(pages per region, P = {host_pages.shape[1]})"
        )
    if not 1 <= top_k <= slot_to_page.shape[-1]:
        raise ValueError(f"need 1 <= top_k <= S = {slot_to_page.shape[-1]}, got {top_k}")


def select_pages_reference(
    q: Tensor,
    digests: Tensor,
    rows: Tensor,
    seq_lens: Tensor,
    slot_to_page: Tensor,
    page_to_slot: Tensor,
    host_pages: Tensor,
    slot_tokens: Tensor,
    *,
    page_size: int,
    num_sink_pages: int,
    num_window_pages: int,
    top_k: int,
    layer: int,
    reduction: str = "softmax_mean",
    scale: float | None = None,
    head_mask: Tensor | None = None,
    out: SelectOutputs | None = None,
    commit: SpeculationCommit | None = None,
    rerank: Rerank | None = None,
) -> SelectOutputs:
    """Reference of `select_pages` (same signature and in-place effects)."""
    _check_common(q, digests, top_k, slot_to_page, page_to_slot, host_pages, reduction)
    if commit is not None:
        commit.check(q, top_k, head_mask, host_pages.shape[0])
    if rerank is not None:
        rerank.check(digests, page_size)
    b, h_q, d = q.shape
    n, h = digests.shape[0], digests.shape[2]
    n_p = host_pages.shape[1]
    g = h_q // h
    s = slot_to_page.shape[-1]
    dev = q.device
    sc = d**-0.5 if scale is None else scale
    hp_rows = host_pages[rows]  # [B, P]
    has_digest = (hp_rows >= 0) & (hp_rows < n)
    # [B, P, 2, H, D]; a page without a digest reads host page 0 (or zeros), masked below.
    safe = torch.where(has_digest, hp_rows, 0)
    dig = digests[safe] if n > 0 else digests.new_zeros(b, n_p, 2, h, d)
    qf = q.float().view(b, h, g, 1, d)
    lo = dig[:, :, 0].float().permute(0, 2, 1, 3).unsqueeze(2)  # [B, H, 1, P, D]
    hi = dig[:, :, 1].float().permute(0, 2, 1, 3).unsqueeze(2)
    raw = torch.maximum(qf * lo, qf * hi).sum(dim=-1)  # [B, H, G, P]
    npg = torch.div(seq_lens + (page_size - 1), page_size, rounding_mode="floor")
    j = torch.arange(n_p, device=dev)
    cand = (j >= num_sink_pages) & (j < (npg - num_window_pages).unsqueeze(1)) & has_digest
    c4 = cand.view(b, 1, 1, n_p)
    if reduction == "softmax_mean":
        probs = torch.softmax(torch.where(c4, raw * sc, _NEG), dim=-1)
        red = torch.nan_to_num(probs, nan=0.0).mean(dim=2)
    elif reduction == "mean":
        red = torch.where(c4, raw, _NEG).mean(dim=2)
    else:
        red = torch.where(c4, raw, _NEG).amax(dim=2)
    # A NaN score (an overflowed digest) ranks lowest: -inf, never selected (the kernel's rule).
    red = torch.where(cand.unsqueeze(1) & ~torch.isnan(red), red, _NEG)  # [B, H, P]
    if rerank is not None:  # the second stage: the best pages re-ranked by their best logit
        second = rerank_scores_reference(q, red, digests, hp_rows, rerank, reduction, sc)
        red = second.scores
        raw = torch.where(second.candidate.unsqueeze(2), second.logits, raw)  # [B, H, G, P]
    vals, idx = torch.sort(red, dim=-1, descending=True, stable=True)
    kk = min(top_k, n_p)
    sel = torch.where(torch.isneginf(vals[..., :kk]), -1, idx[..., :kk])
    if kk < top_k:
        sel = torch.cat((sel, sel.new_full((b, h, top_k - kk), -1)), dim=-1)

    s2p, p2s = slot_to_page[rows], page_to_slot[rows]
    new_s2p, new_p2s, recall, counts = compute_delta_reference(sel, red, s2p, p2s)
    mask = torch.ones(b, h, dtype=torch.bool, device=dev) if head_mask is None else head_mask
    m3 = mask.unsqueeze(-1)
    red = torch.where(m3, red, _NEG)
    sel = torch.where(m3, sel, -1)
    recall = torch.where(m3, recall, -1)
    counts = torch.where(m3, counts, 0)
    slot_to_page[rows] = torch.where(m3, new_s2p, s2p)
    page_to_slot[rows] = torch.where(m3, new_p2s, p2s)

    moved = recall >= 0
    hp = hp_rows.gather(-1, recall.clamp(min=0).view(b, h * s)).view(b, h, s)
    st = slot_tokens[rows].unsqueeze(1).expand(b, h, s)
    heads = torch.arange(h, device=dev).view(1, h, 1).expand(b, h, s)
    lay = torch.full_like(hp, layer)
    work = torch.stack((hp, lay, heads, st), dim=-1)
    work = torch.where(moved.unsqueeze(-1), work, -1).view(b * h * s, 4).to(torch.int32)

    res = out or SelectOutputs.allocate(b, h_q, h, n_p, top_k, s, dev)
    res.selected.copy_(sel)
    res.page_scores.copy_(red)
    res.recall.copy_(recall)
    res.counts.copy_(counts)
    res.work.copy_(work)
    res.raw.copy_(raw.reshape(b, h_q, n_p))
    if commit is not None:
        commit_speculation_reference(commit, rows, seq_lens, q, res.selected, res.counts)
    return res


def select_pages(
    q: Tensor,
    digests: Tensor,
    rows: Tensor,
    seq_lens: Tensor,
    slot_to_page: Tensor,
    page_to_slot: Tensor,
    host_pages: Tensor,
    slot_tokens: Tensor,
    *,
    page_size: int,
    num_sink_pages: int,
    num_window_pages: int,
    top_k: int,
    layer: int,
    reduction: str = "softmax_mean",
    scale: float | None = None,
    head_mask: Tensor | None = None,
    out: SelectOutputs | None = None,
    commit: SpeculationCommit | None = None,
    rerank: Rerank | None = None,
) -> SelectOutputs:
    """Select ``top_k`` pages per (request, KV head) and compute the delta recall.

    Writes the recall work list ``out.work`` (``B * H * S`` rows, one per (request, KV head,
    budget slot), ``-1`` where the slot keeps its page), which `recall_direct` consumes whole;
    the contract is defined in the `freekv_sglang.ops.recall` module docstring.

    Args:
        q: ``[B, H_q, D]`` float16/bfloat16 query.
        digests: ``[N, 2, H, D]`` per-host-page digest store of q's dtype (``N`` = the host
            pool's capacity in pages); logical page ``j`` of request ``b`` has the digest
            ``digests[host_pages[rows[b], j]]``.
        rows: ``[B]`` int64 budget region of each request: its row in the residency stores
            below (distinct, ``< R'``).
        seq_lens: ``[B]`` int64 lengths at which the selection is attended.
        slot_to_page: ``[R', H, S]`` int64 residency store, updated in place.
        page_to_slot: ``[R', H, P]`` int64 inverse map, updated in place.
        host_pages: ``[R', P]`` int64 host pool page of each logical page; ``P`` (pages per
            region) is ``host_pages.shape[1]`` and must equal ``page_to_slot.shape[-1]``. A
            candidate page whose host page is ``< 0`` or ``>= N`` is not selectable (never
            selected, ``-inf`` in ``page_scores``).
        slot_tokens: ``[R', S]`` int64 first token slot of each budget slot.
        page_size, num_sink_pages, num_window_pages, top_k: geometry (`FreeKVConfig`).
        layer: written into the work rows.
        reduction: ``"softmax_mean"``, ``"mean"`` or ``"max"``.
        scale: softmax temperature (default ``D ** -0.5``).
        head_mask: optional ``[B, H]`` bool: only these heads are re-selected (correction).
        out: optional preallocated `SelectOutputs`.
        commit: the speculative selection's commit (`freekv_sglang.ops.speculate`): the
            selection (made for ``seq_lens``) and ``q`` into the regions' speculation state,
            with the step's counters, in the same launch; needs every head (no
            ``head_mask``).
        rerank: the second stage (`freekv_sglang.ops.rerank`): the bound's best
            ``rerank.candidates`` pages per KV head re-ranked by their best logit from the
            key copy ``rerank.codes``, in the select kernel's launch (``page_scores`` then
            holds the re-ranked scores, ``raw`` the candidates' logits).
    """
    _check_common(q, digests, top_k, slot_to_page, page_to_slot, host_pages, reduction)
    if commit is not None:
        commit.check(q, top_k, head_mask, host_pages.shape[0])
    if rerank is not None:
        rerank.check(digests, page_size)
    ext = extension_for(q, digests, rows, seq_lens, slot_to_page, page_to_slot, host_pages)
    if ext is None:
        return select_pages_reference(
            q, digests, rows, seq_lens, slot_to_page, page_to_slot, host_pages, slot_tokens,
            page_size=page_size, num_sink_pages=num_sink_pages, num_window_pages=num_window_pages,
            top_k=top_k, layer=layer, reduction=reduction, scale=scale, head_mask=head_mask,
            out=out, commit=commit, rerank=rerank,
        )  # fmt: skip
    b, h_q, d = q.shape
    res = out or SelectOutputs.allocate(
        b, h_q, digests.shape[2], host_pages.shape[1], top_k, slot_to_page.shape[-1], q.device
    )
    ext.select_pages(
        q, digests, rows, seq_lens, slot_to_page, page_to_slot, host_pages, slot_tokens,
        head_mask, page_size, num_sink_pages, num_window_pages, top_k, layer,
        REDUCTIONS[reduction], d**-0.5 if scale is None else float(scale),
        res.raw, res.page_scores, res.selected, res.recall, res.counts, res.work,
        [] if commit is None else commit.tensors(), None if commit is None else commit.live,
        None if rerank is None else rerank.codes, 0 if rerank is None else rerank.bits,
        0 if rerank is None else rerank.candidates,
    )  # fmt: skip
    return res
