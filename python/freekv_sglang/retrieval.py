"""FreeKV retrieval math: digests, Quest scores, GQA reduction, top-k, delta, correction.

Every function here is pure (tensor in, tensor out; the one in-place exception,
`update_digests`, says so), batched over a ragged batch given as padded tensors plus
``seq_lens``, device-agnostic (CPU or CUDA, whatever device the inputs are on) and free of host
synchronisation (no ``.item()``, no data-dependent shapes). They are the pure-torch references
that the CUDA kernels in ``freekv_sglang.ops`` must equal; the SGLang adapter calls them (or
the kernels) on the model-runner's forward stream, once per decode step and layer.

Shapes (``B`` requests in the batch, ``H_q`` query heads, ``H`` KV heads, ``G = H_q / H`` query
heads per KV head, query head ``g`` belongs to KV head ``g // G`` as in HF ``repeat_kv``;
``D`` head dim; ``P`` padded logical pages; ``K`` selected pages; ``S >= K`` budget slots):

- keys: ``[B, L, H, D]`` (NHD, post-RoPE), any float dtype;
- ``seq_lens``: ``[B]`` int64, tokens in each request's context (including the current token);
- digests: ``[B, P, 2, H, D]`` in the keys' dtype, ``[..., 0, :, :]`` = lo (element-wise min),
  ``[..., 1, :, :]`` = hi (element-wise max); for ``digest_kind="mean"`` both hold the mean key,
  and ``"minmax_slow"`` is the min/max box with the dimensions of the faster half of the rotary
  pairs zeroed, so one score formula serves every kind. Only full pages have meaningful digests;
- scores: float32;
- page indices: int64 logical page numbers, ``-1`` for "none" (padding of a short selection, an
  empty slot, a non-resident page);
- residency per (request, KV head): ``slot_to_page [B, H, S]`` and ``page_to_slot [B, H, P]``.

Page geometry: see `freekv_sglang.config`. Candidates for selection at length ``L`` are pages
``j`` with ``num_sink_pages <= j < ceil(L/p) - num_window_pages``; since the window holds at
least one page, every candidate is full and has a digest.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig

__all__ = [
    "Delta",
    "Selection",
    "build_digests",
    "candidate_mask",
    "compute_delta",
    "correction_flags",
    "fits_budget",
    "num_pages",
    "page_digests",
    "quest_scores",
    "reduce_gqa",
    "select_pages",
    "topk_pages",
    "update_digests",
]


def num_pages(seq_lens: Tensor, page_size: int) -> Tensor:
    """Logical pages (the last may be partial) of each context: ``ceil(seq_lens / p)``, int64."""
    return torch.div(seq_lens + (page_size - 1), page_size, rounding_mode="floor")


def page_digests(page_keys: Tensor, kind: str = "minmax") -> Tensor:
    """Digests of full pages.

    Args:
        page_keys: ``[N, p, H, D]`` post-RoPE keys of N full pages.
        kind: ``"minmax"`` (lo = min, hi = max over the page's tokens), ``"mean"``
            (lo = hi = mean key) or ``"minmax_slow"``: the min/max box with lo = hi = 0 on the
            dimensions of the faster half of the rotary pairs, so that Quest's bound sums only
            over the slower half. Rotary pair ``i`` is dimensions ``(i, i + D/2)`` (the
            rotate-half layout of Llama-style models), its frequency falling with ``i``; the
            faster half is pairs ``i < D/4``. ``D`` must be a multiple of 4.

    Returns:
        ``[N, 2, H, D]`` in ``page_keys.dtype``.
    """
    if kind in ("minmax", "minmax_slow"):
        dig = torch.stack((page_keys.amin(dim=1), page_keys.amax(dim=1)), dim=1)
        if kind == "minmax":
            return dig
        d = page_keys.shape[-1]
        if d % 4:
            raise ValueError(f"digest kind 'minmax_slow' needs a head dim divisible by 4, got {d}")
        pair = torch.arange(d, device=page_keys.device) % (d // 2)
        return dig * (pair >= d // 4).to(dig.dtype)
    if kind == "mean":
        m = page_keys.float().mean(dim=1).to(page_keys.dtype)
        return torch.stack((m, m), dim=1)
    raise ValueError(f"digest kind must be 'minmax', 'mean' or 'minmax_slow', got {kind!r}")


def build_digests(
    keys: Tensor,
    seq_lens: Tensor,
    page_size: int,
    kind: str = "minmax",
    max_pages: int | None = None,
) -> Tensor:
    """Digests of every full page of a padded batch (after prefill).

    Args:
        keys: ``[B, L, H, D]`` padded keys; tokens at or beyond ``seq_lens[b]`` are ignored.
        seq_lens: ``[B]`` int64.
        page_size: ``p``.
        kind: see `page_digests`.
        max_pages: ``P`` of the result (default ``ceil(L / p)``); must be ``>= ceil(L / p)``
            when given, or the pages beyond it are dropped.

    Returns:
        ``[B, P, 2, H, D]``; pages that are not full (partial or past the end) are zero.
    """
    b, length, h, d = keys.shape
    p_all = -(-length // page_size)
    p_out = p_all if max_pages is None else max_pages
    pad = p_all * page_size - length
    if pad:
        keys = torch.cat((keys, keys.new_zeros(b, pad, h, d)), dim=1)
    pages = keys.reshape(b * p_all, page_size, h, d)
    dig = page_digests(pages, kind).view(b, p_all, 2, h, d)
    full = torch.arange(p_all, device=keys.device) < torch.div(
        seq_lens, page_size, rounding_mode="floor"
    ).unsqueeze(1)
    dig = dig * full.view(b, p_all, 1, 1, 1).to(dig.dtype)
    if p_out >= p_all:
        out = dig.new_zeros(b, p_out, 2, h, d)
        out[:, :p_all] = dig
        return out
    return dig[:, :p_out].contiguous()


def update_digests(
    digests: Tensor,
    rows: Tensor,
    keys: Tensor,
    seq_lens: Tensor,
    page_size: int,
    kind: str = "minmax",
) -> None:
    """In place: (re)write the digest of the last full page of each request in the batch.

    Called once per decode step after the step's key is appended; it writes the digest of
    page ``seq_lens // p - 1`` (a page that just filled when ``seq_lens % p == 0``; rewriting an
    older page with the same immutable keys is harmless). Requests with no full page are
    skipped. Host-sync free.

    Args:
        digests: ``[R, P, 2, H, D]`` digest store, indexed by state row.
        rows: ``[B]`` int64 rows of ``digests`` for the batch's requests.
        keys: ``[B, L, H, D]`` padded keys of the batch.
        seq_lens: ``[B]`` int64.
    """
    b, length, h, d = keys.shape
    last = torch.div(seq_lens, page_size, rounding_mode="floor") - 1  # [B]
    start = last.clamp(min=0) * page_size
    tok = start.unsqueeze(1) + torch.arange(page_size, device=keys.device)  # [B, p]
    tok = tok.clamp(max=length - 1)
    page_keys = keys.gather(1, tok.view(b, page_size, 1, 1).expand(b, page_size, h, d))
    dig = page_digests(page_keys, kind).to(digests.dtype)  # [B, 2, H, D]
    n_p = digests.shape[1]
    has = last >= 0
    # Requests without a full page write into a scratch copy of their own page 0 value.
    page = torch.where(has, last, torch.zeros_like(last)).clamp(max=n_p - 1)
    old = digests[rows, page]
    digests[rows, page] = torch.where(has.view(b, 1, 1, 1), dig, old)


def candidate_mask(seq_lens: Tensor, max_pages: int, cfg: FreeKVConfig) -> Tensor:
    """``[B, P]`` bool: pages that selection may choose at these lengths (not sink, not window,
    below ``ceil(L/p) - num_window_pages``)."""
    j = torch.arange(max_pages, device=seq_lens.device)
    end = num_pages(seq_lens, cfg.page_size) - cfg.num_window_pages
    return (j >= cfg.num_sink_pages) & (j < end.unsqueeze(1))


def fits_budget(seq_lens: Tensor, cfg: FreeKVConfig) -> Tensor:
    """``[B]`` bool: the context fits the budget (``ceil(L/p) <= budget_pages``), so the request
    attends densely. In that case the candidates number at most ``num_selected_pages`` and
    selection returns all of them, so sink + selected + window covers every page."""
    return num_pages(seq_lens, cfg.page_size) <= cfg.budget_pages


def quest_scores(q: Tensor, digests: Tensor) -> Tensor:
    """Quest upper bound ``s[b, g, j] = sum_i max(q_i * hi_{j,i}, q_i * lo_{j,i})``.

    Args:
        q: ``[B, H_q, D]`` query of one decode step (post-RoPE).
        digests: ``[B, P, 2, H, D]``.

    Returns:
        ``[B, H_q, P]`` float32 (query head ``g`` uses KV head ``g // (H_q // H)``).
    """
    b, h_q, d = q.shape
    h = digests.shape[3]
    group = h_q // h
    qf = q.float().view(b, h, group, 1, d)  # [B, H, G, 1, D]
    lo = digests[:, :, 0].float().permute(0, 2, 1, 3).unsqueeze(2)  # [B, H, 1, P, D]
    hi = digests[:, :, 1].float().permute(0, 2, 1, 3).unsqueeze(2)
    s = torch.maximum(qf * lo, qf * hi).sum(dim=-1)  # [B, H, G, P]
    return s.reshape(b, h_q, -1)


def reduce_gqa(
    scores: Tensor, candidates: Tensor, num_kv_heads: int, reduction: str, scale: float
) -> Tensor:
    """One score per (KV head, page) from the query heads' Quest scores.

    Args:
        scores: ``[B, H_q, P]`` float32 from `quest_scores`.
        candidates: ``[B, P]`` bool from `candidate_mask`, or ``[B, H, P]`` per KV head.
        num_kv_heads: ``H``.
        reduction: ``"softmax_mean"`` (softmax of ``scale * scores`` over the candidate pages
            per query head, then mean over the group; paper), ``"mean"`` or ``"max"`` of the raw
            scores over the group.
        scale: softmax temperature, normally the attention scale ``D ** -0.5``.

    Returns:
        ``[B, H, P]`` float32; non-candidate pages are ``-inf``.
    """
    b, h_q, n_p = scores.shape
    group = h_q // num_kv_heads
    neg = torch.tensor(float("-inf"), device=scores.device)
    cand = candidates.view(b, -1, n_p)  # [B, 1 or H, P]
    masked = torch.where(cand.unsqueeze(2), scores.view(b, num_kv_heads, group, n_p), neg)
    if reduction == "softmax_mean":
        probs = torch.softmax(masked * scale, dim=-1)
        # A row with no candidate is all -inf and gives NaN: zero it, the mask restores -inf.
        red = torch.nan_to_num(probs, nan=0.0).mean(dim=2)
    elif reduction == "mean":
        red = masked.mean(dim=2)
    elif reduction == "max":
        red = masked.amax(dim=2)
    else:
        raise ValueError(f"gqa reduction must be softmax_mean, mean or max, got {reduction!r}")
    return torch.where(cand, red, neg)


def topk_pages(reduced: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k candidate pages per KV head, best first.

    Args:
        reduced: ``[B, H, P]`` float32 from `reduce_gqa` (non-candidates ``-inf``).
        k: pages to select.

    Returns:
        ``(pages, scores)``, both ``[B, H, k]``: int64 page indices (``-1`` where fewer than k
        candidates exist; these trail the valid ones) and their float32 scores (``-inf`` there).
        Equal scores go to the lower page index first (a stable sort; the select kernel's
        rule), so every implementation picks the same pages when scores tie, as they do
        where softmax probabilities underflow to zero.
    """
    b, h, n_p = reduced.shape
    kk = min(k, n_p)
    vals, idx = torch.sort(reduced, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :kk], idx[..., :kk]
    idx = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx)
    if kk < k:
        idx = torch.cat((idx, idx.new_full((b, h, k - kk), -1)), dim=-1)
        vals = torch.cat((vals, vals.new_full((b, h, k - kk), float("-inf"))), dim=-1)
    return idx, vals


class Selection(NamedTuple):
    """Result of `select_pages`: ``pages [B, H, K]`` int64 (-1 padded, best first) and the
    reduced scores of every page ``page_scores [B, H, P]`` float32 (for victim choice)."""

    pages: Tensor
    page_scores: Tensor


def select_pages(
    q: Tensor,
    digests: Tensor,
    seq_lens: Tensor,
    cfg: FreeKVConfig,
    scale: float | None = None,
) -> Selection:
    """Score, reduce over the GQA group and take top-k per KV head.

    For speculative retrieval the caller passes the query of step t and the lengths of step
    t+1 (``seq_lens + 1``); for correction or non-speculative selection, the current lengths.

    Args:
        q: ``[B, H_q, D]``.
        digests: ``[B, P, 2, H, D]`` (gathered for the batch's rows).
        seq_lens: ``[B]`` int64, the lengths at which the selection will be attended.
        cfg: settings (``page_size``, sink/window pages, ``num_selected_pages``,
            ``gqa_reduction``).
        scale: softmax temperature of ``"softmax_mean"``; default ``D ** -0.5``.
    """
    d = q.shape[-1]
    sc = d**-0.5 if scale is None else scale
    cand = candidate_mask(seq_lens, digests.shape[1], cfg)
    raw = quest_scores(q, digests)
    red = reduce_gqa(raw, cand, digests.shape[3], cfg.gqa_reduction, sc)
    pages, _ = topk_pages(red, cfg.num_selected_pages)
    return Selection(pages, red)


class Delta(NamedTuple):
    """Result of `compute_delta` (all per request and KV head).

    Attributes:
        slot_to_page: ``[B, H, S]`` int64 residency after the recall.
        page_to_slot: ``[B, H, P]`` int64 inverse map after the recall.
        recall: ``[B, H, S]`` int64: the logical page to copy into each slot, ``-1`` = keep.
        hits: ``[B, H]`` int64 selected pages that were already resident.
        recalled: ``[B, H]`` int64 pages to copy (``(recall >= 0).sum(-1)``).
        selected: ``[B, H]`` int64 valid selected pages.
    """

    slot_to_page: Tensor
    page_to_slot: Tensor
    recall: Tensor
    hits: Tensor
    recalled: Tensor
    selected: Tensor


def compute_delta(
    selected: Tensor, page_scores: Tensor, slot_to_page: Tensor, page_to_slot: Tensor
) -> Delta:
    """The minimal recall that makes every selected page resident.

    Selected pages already resident stay in their slots (no copy). Each missing page takes a
    victim slot: empty slots first, then slots whose page is not selected, lowest
    ``page_scores`` first (stable by slot index on ties); the best-scoring missing page gets
    the first victim. Slots holding selected pages are never victims, so at most
    ``|selected| <= S`` pages are resident-and-selected and nothing selected is recalled twice.

    Args:
        selected: ``[B, H, K]`` int64 from `select_pages` (``-1`` padded, no duplicates).
        page_scores: ``[B, H, P]`` float32 reduced scores (victim order).
        slot_to_page: ``[B, H, S]`` int64 current residency, ``S >= K``.
        page_to_slot: ``[B, H, P]`` int64 current inverse map.
    """
    b, h, s = slot_to_page.shape
    n_p = page_to_slot.shape[-1]
    valid = selected >= 0
    sel0 = selected.clamp(min=0)
    hit = valid & (page_to_slot.gather(-1, sel0) >= 0)
    need = valid & ~hit
    # Which slots hold a selected page (column n_p collects the padding).
    in_sel = torch.zeros(b, h, n_p + 1, dtype=torch.bool, device=selected.device)
    in_sel.scatter_(-1, torch.where(valid, selected, n_p), True)
    occupied = slot_to_page >= 0
    slot_page = torch.where(occupied, slot_to_page, n_p)
    keep = in_sel.gather(-1, slot_page) & occupied
    ninf = page_scores.new_full((b, h, 1), float("-inf"))
    slot_score = torch.cat((page_scores, ninf), dim=-1).gather(-1, slot_page)
    key = torch.where(keep, torch.full_like(slot_score, float("inf")), slot_score)
    victims = torch.argsort(key, dim=-1, stable=True)  # [B, H, S], ascending
    rank = (torch.cumsum(need.to(torch.int64), dim=-1) - 1).clamp(min=0)
    target = victims.gather(-1, rank)  # [B, H, K]
    dump_slot = torch.where(need, target, s)
    new_s2p = torch.cat((slot_to_page, slot_to_page.new_full((b, h, 1), -1)), dim=-1)
    evicted = new_s2p.gather(-1, dump_slot)  # -1 for empty slots and the dump column
    new_s2p.scatter_(-1, dump_slot, selected)
    recall = slot_to_page.new_full((b, h, s + 1), -1)
    recall.scatter_(-1, dump_slot, selected)
    new_p2s = torch.cat((page_to_slot, page_to_slot.new_full((b, h, 1), -1)), dim=-1)
    new_p2s.scatter_(-1, torch.where(need & (evicted >= 0), evicted, n_p), -1)
    new_p2s.scatter_(-1, torch.where(need, selected, n_p), target)
    return Delta(
        slot_to_page=new_s2p[..., :s].contiguous(),
        page_to_slot=new_p2s[..., :n_p].contiguous(),
        recall=recall[..., :s].contiguous(),
        hits=hit.sum(-1),
        recalled=need.sum(-1),
        selected=valid.sum(-1),
    )


def correction_flags(
    q: Tensor, q_prev: Tensor, num_kv_heads: int, tau: float | None
) -> tuple[Tensor, Tensor]:
    """Fine-grained correction: which KV heads must be re-selected with the current query.

    ``C[b, h] = mean over the group of cos(q_t[b, g], q_{t-1}[b, g])``; a head is flagged when
    ``C < tau``. With ``tau=None`` (correction off) nothing is flagged. A zero query has cosine
    0 (``torch.nn.functional.cosine_similarity`` with eps 1e-8); ``C`` is clamped to [-1, 1] so
    that rounding never fires ``tau=-1``.

    Args:
        q: ``[B, H_q, D]`` query of step t.
        q_prev: ``[B, H_q, D]`` query of step t-1 (the one that made the speculative selection).
        num_kv_heads: ``H``.
        tau: threshold in [-1, 1] or None.

    Returns:
        ``(flags [B, H] bool, C [B, H] float32)``.
    """
    b, h_q, _ = q.shape
    cos = torch.nn.functional.cosine_similarity(q.float(), q_prev.float(), dim=-1, eps=1e-8)
    c = cos.view(b, num_kv_heads, h_q // num_kv_heads).mean(dim=-1).clamp(-1.0, 1.0)
    if tau is None:
        return torch.zeros_like(c, dtype=torch.bool), c
    return c < tau, c
