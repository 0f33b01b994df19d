"""The reference FreeKV decode step and the dense attention helpers it is checked against.

`freekv_attention` applies, for one layer and one decode step of a ragged batch, exactly what
the engine does: the speculative selection made at the previous step (already recalled into
the budget slots), the correction check, the synchronous re-selection and recall of flagged KV
heads, attention over sink + selected + window, then the speculative selection and recall for
the next step with the current query. It runs on the caller's device with torch only; the
accuracy harness (``benchmarks/bench_accuracy.py``) and the tests call it, and the SGLang
adapter reproduces its order with the real recall machinery and kernels.

Who calls what: the model-driving thread calls `prime_after_prefill` once per request and
layer after a dense prefill, then `freekv_attention` once per decode step and layer. Both read
and write the rows of a `freekv_sglang.state.FreeKVState`; the caller appends the step's key
and value to the cache before calling (as SGLang does before its attention backend runs).

Tensor layouts: ``q [B, H_q, D]`` (one decode token per request), ``k``/``v [B, L, H, D]``
padded caches, ``seq_lens [B]`` int64 (tokens in the cache, including the current one),
``rows [B]`` int64 state rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import (
    Selection,
    build_digests,
    candidate_mask,
    compute_delta,
    correction_flags,
    fits_budget,
    num_pages,
    reduce_gqa,
    select_pages,
    topk_pages,
    update_digests,
)
from freekv_sglang.state import FreeKVState, LayerState

__all__ = [
    "attended_token_mask",
    "dense_attention",
    "freekv_attention",
    "masked_attention",
    "oracle_pages",
    "prime_after_prefill",
    "quantize_keys",
    "rerank_pages",
]


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, token_mask: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Softmax attention of one query per request over the tokens ``token_mask`` keeps.

    Args:
        q: ``[B, H_q, D]``.
        k, v: ``[B, L, H, D]``.
        token_mask: ``[B, H, L]`` bool (per KV head; shared by its query heads).
        scale: logit scale.

    Returns:
        ``(out [B, H_q, D] in q.dtype, probs [B, H_q, L] float32)``; computed in float32.
    """
    return _softmax_out(_logits(q, k, scale), token_mask, v, q.dtype)


def _logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``[B, H, G, L]`` float32 logits of ``q [B, H_q, D]`` against ``k [B, L, H, D]``."""
    b, h_q, d = q.shape
    h = k.shape[2]
    qf = q.float().view(b, h, h_q // h, d)
    # [B, L, H, D] -> [B, H, L, D]: free when the cache is an HND tensor seen through an NHD view.
    kt = k.float().transpose(1, 2)
    return torch.matmul(qf, kt.transpose(-1, -2)) * scale


def _softmax_out(
    logits: Tensor, token_mask: Tensor, v: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    b, h, group, _ = logits.shape
    masked = logits.masked_fill(~token_mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    out = torch.matmul(probs, v.float().transpose(1, 2))  # [B, H, G, D]
    return out.reshape(b, h * group, -1).to(dtype), probs.reshape(b, h * group, -1)


def _valid_tokens(seq_lens: Tensor, length: int, num_kv_heads: int) -> Tensor:
    t = torch.arange(length, device=seq_lens.device)
    return (t < seq_lens.unsqueeze(1)).unsqueeze(1).expand(-1, num_kv_heads, -1)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, seq_lens: Tensor, scale: float | None = None
) -> Tensor:
    """Full attention over the first ``seq_lens[b]`` tokens (``q [B, H_q, D]``, ``k``/``v
    [B, L, H, D]``); the baseline FreeKV must equal while a context fits its budget."""
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    mask = _valid_tokens(seq_lens, k.shape[1], k.shape[2])
    return masked_attention(q, k, v, mask, sc)[0]


def attended_token_mask(
    pages: Tensor, seq_lens: Tensor, length: int, cfg: FreeKVConfig, dense_if_fits: bool = True
) -> Tensor:
    """``[B, H, L]`` bool: tokens of sink pages, of the selected ``pages [B, H, K]`` (``-1``
    ignored) and of window pages, below ``seq_lens``. With ``dense_if_fits`` a request whose
    context fits the budget attends to every token (the dense-while-it-fits rule)."""
    b, h, _ = pages.shape
    p = cfg.page_size
    n_p = -(-length // p)
    sel = torch.zeros(b, h, n_p + 1, dtype=torch.bool, device=pages.device)
    sel.scatter_(-1, torch.where(pages >= 0, pages, n_p), True)
    j = torch.arange(n_p, device=pages.device)
    total = num_pages(seq_lens, p)
    fixed = (j < cfg.num_sink_pages) | (j >= (total - cfg.num_window_pages).unsqueeze(1))
    page_mask = sel[..., :n_p] | fixed.unsqueeze(1)
    if dense_if_fits:
        page_mask = page_mask | fits_budget(seq_lens, cfg).view(b, 1, 1)
    tok = page_mask.repeat_interleave(p, dim=-1)[..., :length]
    return tok & _valid_tokens(seq_lens, length, h)


def apply_delta(
    ls: LayerState, rows: Tensor, pages: Tensor, scores: Tensor, heads: Tensor, counted: Tensor
) -> Tensor:
    """Make ``pages`` resident for the ``heads [B, H]`` mask in ``rows``' slots and count the
    delta for rows where ``counted [B]``.

    Updates both residency maps of ``ls`` and returns the recall list ``[B, H, S]`` int64: the
    logical page each slot must receive, ``-1`` where the slot keeps its page (also for heads
    outside the mask). The engine moves those pages; this reference only tracks residency."""
    s2p = ls.slot_to_page[rows]
    p2s = ls.page_to_slot[rows]
    d = compute_delta(pages, scores, s2p, p2s)
    m3 = heads.unsqueeze(-1)
    ls.slot_to_page[rows] = torch.where(m3, d.slot_to_page, s2p)
    ls.page_to_slot[rows] = torch.where(m3, d.page_to_slot, p2s)
    w = heads & counted.unsqueeze(1)
    ls.count(rows, "selections", w.sum(-1))
    ls.count(rows, "pages_selected", (d.selected * w).sum(-1))
    ls.count(rows, "pages_recalled", (d.recalled * w).sum(-1))
    ls.count(rows, "resident_hits", (d.hits * w).sum(-1))
    return torch.where(m3, d.recall, torch.full_like(d.recall, -1))


def prime_after_prefill(
    state: FreeKVState, layer: int, rows: Tensor, k: Tensor, seq_lens: Tensor
) -> None:
    """Set up ``rows`` of ``layer`` after a dense prefill of ``seq_lens`` tokens.

    Builds the digests of every full prompt page and leaves the rows with nothing resident, no
    speculative selection and no previous query: the first decode step then selects with its
    own query and recalls every selected page before attending, exactly what the engine does
    at a request's first decode step over budget (it takes a zeroed budget region and has no
    selection to correct). Dense layers are left untouched.
    """
    cfg = state.cfg
    if cfg.is_dense_layer(layer):
        return
    ls = state.layers[layer]
    dig = build_digests(k, seq_lens, cfg.page_size, cfg.digest_kind, state.max_pages)
    ls.digests[rows] = dig.to(ls.digests.dtype)
    ls.slot_to_page[rows] = -1
    ls.page_to_slot[rows] = -1
    ls.spec_len[rows] = 0
    ls.has_prev[rows] = False


def _by_page(x: Tensor, num_pages: int, page_size: int, fill: float) -> Tensor:
    """``x [..., L]`` per token as ``[..., num_pages, page_size]``: cut or padded with
    ``fill`` to ``num_pages`` whole pages."""
    pad = num_pages * page_size - x.shape[-1]
    if pad > 0:
        x = torch.cat((x, x.new_full((*x.shape[:-1], pad), fill)), dim=-1)
    return x[..., : num_pages * page_size].unflatten(-1, (num_pages, page_size))


def oracle_pages(
    probs: Tensor, seq_lens: Tensor, num_pages_out: int, cfg: FreeKVConfig
) -> Selection:
    """The candidate pages that hold the most dense attention mass of this step, per KV head.

    ``probs [B, H, G, L]`` is the dense softmax of the step's queries (grouped by KV head); a
    page's score is the mass of its tokens summed over the group. No digest bound can choose
    better: for a budget of K pages, these K pages maximise the attended mass of sink +
    selected + window. Returns the selection and the scores padded to ``num_pages_out`` pages
    (``-inf`` outside the candidates), as `select_pages` does.
    """
    per_page = _by_page(probs.sum(2), num_pages_out, cfg.page_size, 0.0).sum(-1)  # [B, H, P]
    cand = candidate_mask(seq_lens, num_pages_out, cfg)
    scores = torch.where(cand.unsqueeze(1), per_page, per_page.new_tensor(float("-inf")))
    pages, _ = topk_pages(scores, cfg.num_selected_pages)
    return Selection(pages, scores)


def rerank_pages(
    sel: Selection,
    logits: Tensor,
    seq_lens: Tensor,
    cfg: FreeKVConfig,
    candidates: int,
    scale: float,
    select_scale: float,
    score: str = "max",
) -> Selection:
    """Re-rank each KV head's ``candidates`` best pages under the digest bound by the pages'
    exact best logit (the largest ``q . k`` over the page's tokens, per query head; ``score``
    ``"mass"``: their log-sum-exp at temperature ``select_scale``, so that the group softmax
    weighs each page by its tokens' summed attention), reduced over the GQA group as
    ``cfg.gqa_reduction`` says, and take the top ``num_selected_pages``. ``"share"`` sums over
    the group each query head's softmax mass on the page among the sink, window and candidate
    tokens (`_group_share`): over every candidate and the cache's keys, the oracle's ranking.

    A study of a two-stage selection (``docs/selection.md``): it reads every key of the
    candidate pages, which the reference step has and the serving path does not keep on the
    device. ``logits [B, H, G, L]`` are the step's attention logits (``scale`` applied);
    ``sel`` is the bound's selection at ``seq_lens``. Returns pages and scores as
    `select_pages` does (``-inf`` outside the re-ranked candidates).
    """
    b, h, g, length = logits.shape
    n_p = sel.page_scores.shape[-1]
    top, _ = topk_pages(sel.page_scores, min(candidates, n_p))  # [B, H, M], -1 padded
    keep = torch.zeros(b, h, n_p + 1, dtype=torch.bool, device=logits.device)
    keep.scatter_(-1, torch.where(top < 0, n_p, top), True)
    keep = keep[..., :n_p] & candidate_mask(seq_lens, n_p, cfg).unsqueeze(1)  # [B, H, P]
    valid = torch.arange(length, device=logits.device) < seq_lens.view(b, 1, 1, 1)
    raw = (logits / scale).masked_fill(~valid, float("-inf"))
    by_page = _by_page(raw, n_p, cfg.page_size, float("-inf"))  # [B, H, G, P, p]
    if score == "max":
        best = by_page.amax(-1)  # [B, H, G, P]
        red = reduce_gqa(best.view(b, h * g, n_p), keep, h, cfg.gqa_reduction, select_scale)
    elif score == "mass":
        best = torch.logsumexp(by_page * select_scale, -1) / select_scale
        red = reduce_gqa(best.view(b, h * g, n_p), keep, h, cfg.gqa_reduction, select_scale)
    elif score == "share":
        lse = torch.logsumexp(by_page * select_scale, -1)
        red = _group_share(lse, raw, keep, seq_lens, cfg, select_scale)
    else:
        raise ValueError(f"score must be 'max', 'mass' or 'share', got {score!r}")
    pages, _ = topk_pages(red, cfg.num_selected_pages)
    return Selection(pages, red)


def _group_share(
    lse: Tensor,
    raw: Tensor,
    keep: Tensor,
    seq_lens: Tensor,
    cfg: FreeKVConfig,
    select_scale: float,
) -> Tensor:
    """``[B, H, P]``: log of each kept page's attention share summed over the GQA group.

    A query head's share of a page is its softmax (temperature ``select_scale``) over the
    tokens the device can see at selection time: sink and window tokens and the kept
    candidates' tokens. Summing shares over the group weighs each query head by how much of its
    attention the candidates hold, as `oracle_pages` does with the dense softmax; the softmax
    over candidate pages alone (``softmax_mean``) gives every query head one unit to spread.
    ``lse [B, H, G, P]`` is the log-sum-exp of each page's logits at temperature
    ``select_scale``; ``raw [B, H, G, L]`` the unscaled logits (``-inf`` past ``seq_lens``).
    """
    b, h = lse.shape[:2]
    length = raw.shape[-1]
    none = torch.full((b, h, 1), -1, dtype=torch.int64, device=raw.device)
    fixed = attended_token_mask(none, seq_lens, length, cfg, dense_if_fits=False)  # [B, H, L]
    fixed_lse = torch.logsumexp(
        (raw * select_scale).masked_fill(~fixed.unsqueeze(2), float("-inf")), -1
    )  # [B, H, G]
    kept_lse = torch.logsumexp(lse.masked_fill(~keep.unsqueeze(2), float("-inf")), -1)
    norm = torch.logaddexp(fixed_lse, kept_lse)  # [B, H, G]
    share = torch.logsumexp(lse - norm.unsqueeze(-1), dim=2)  # [B, H, P]
    return share.masked_fill(~keep, float("-inf"))


def quantize_keys(k: Tensor, page_size: int, bits: int) -> Tensor:
    """``k [B, L, H, D]`` as a ``bits``-bit copy of it would hold it: each page's keys, per KV
    head and channel, rounded to ``2 ** bits`` levels between that channel's min and max over
    the page (which the page's min/max digest already stores: the copy costs ``bits`` per
    element on top of it). Returned dequantized, in float32, ``[B, L, H, D]``."""
    b, length, h, d = k.shape
    n = -(-length // page_size)
    kp = k.float()
    if n * page_size > length:
        pad = kp[:, -1:].expand(b, n * page_size - length, h, d)  # repeats the last token
        kp = torch.cat((kp, pad), dim=1)
    kp = kp.view(b, n, page_size, h, d)
    lo, hi = kp.amin(2, keepdim=True), kp.amax(2, keepdim=True)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((kp - lo) / step)
    return (lo + codes * step).view(b, n * page_size, h, d)[:, :length]


def freekv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_lens: Tensor,
    state: FreeKVState,
    layer: int,
    rows: Tensor,
    scale: float | None = None,
    collect_metrics: bool = False,
    select_scale: float | None = None,
    oracle: bool = False,
    rerank: int = 0,
    rerank_bits: int = 0,
    rerank_score: str = "max",
) -> Tensor:
    """One FreeKV decode step of ``layer`` for a ragged batch; returns ``[B, H_q, D]``.

    Order of operations (``cfg.selection == "speculative"``, the FreeKV default):

    1. write the digest of a page that just filled;
    2. take the speculative selection made at the previous step for this length (a request
       without one, e.g. the first step after `prime_after_prefill`, selects with ``q`` now,
       synchronously);
    3. correction: KV heads whose group-mean cosine of ``q`` and the previous query is below
       ``tau`` are re-selected with ``q`` and their delta recalled now;
    4. attend over sink + selected + window (every token while the context fits the budget);
    5. select with ``q`` for length ``seq_lens + 1``, recall the delta (the engine does this
       asynchronously), remember ``q``.

    ``"current"`` selects with ``q`` at step 2 and skips 3 and 5 (Quest/ArkVale); ``"none"``
    attends sink + window only. Dense layers (``cfg.dense_layers``) attend densely and keep no
    state. Counters of selections and recalls count only requests over the budget (under it
    every page is on the device anyway).

    Args:
        q: ``[B, H_q, D]``.
        k, v: ``[B, L, H, D]`` caches that already hold this step's token.
        seq_lens: ``[B]`` int64.
        state: per-request state; ``rows [B]`` int64 names the batch's rows.
        layer: layer index.
        scale: logit scale (default ``D ** -0.5``).
        collect_metrics: also run dense attention and add, per query head of requests over
            budget, the attention-mass recall (dense softmax mass inside the attended set)
            and the relative L2 error of the output to the state's metrics.
        select_scale: temperature of the group softmax of the selection (``"softmax_mean"``):
            default the logit scale (as the engine passes it); ``1.0`` takes the softmax of
            the raw bound scores (see ``docs/selection.md``).
        oracle: choose each step's pages by their true attention mass (`oracle_pages`)
            instead of the digests, with the current query and no speculation: the best any
            selection of this budget can do (accuracy studies only).
        rerank: when positive, every selection (current and speculative) re-ranks the
            digests' best ``rerank * num_selected_pages`` pages per KV head by their exact
            best logit (`rerank_pages`; accuracy studies only).
        rerank_bits: when positive, the re-ranking reads keys of that many bits per element
            (`quantize_keys`) instead of the cache's.
        rerank_score: ``"max"`` (the pages' best logit), ``"mass"`` (their tokens' summed
            attention) or ``"share"`` (their share of each query head's visible attention,
            summed over the group; `rerank_pages`).
    """
    cfg = state.cfg
    sc = q.shape[-1] ** -0.5 if scale is None else scale
    sel_sc = sc if select_scale is None else select_scale
    if cfg.is_dense_layer(layer):
        return dense_attention(q, k, v, seq_lens, sc)
    ls = state.layers[layer]
    b = q.shape[0]
    h = state.num_kv_heads
    length = k.shape[1]
    update_digests(ls.digests, rows, k, seq_lens, cfg.page_size, cfg.digest_kind)
    over = ~fits_budget(seq_lens, cfg)
    all_heads = torch.ones(b, h, dtype=torch.bool, device=q.device)
    logits = _logits(q, k, sc)
    rr_logits = logits
    if rerank > 0 and rerank_bits > 0:
        rr_logits = _logits(q, quantize_keys(k, cfg.page_size, rerank_bits).to(k.dtype), sc)
    dense_mask = _valid_tokens(seq_lens, length, h)
    speculate = cfg.selection == "speculative" and not oracle
    if oracle:
        dense_probs = torch.softmax(logits.masked_fill(~dense_mask.unsqueeze(2), float("-inf")), -1)
        now = oracle_pages(dense_probs, seq_lens, ls.page_to_slot.shape[-1], cfg)
        pages = now.pages
        apply_delta(ls, rows, pages, now.page_scores, all_heads, over)
    elif cfg.selection == "none":
        pages = torch.full((b, h, cfg.num_selected_pages), -1, dtype=torch.int64, device=q.device)
    else:
        dig = ls.digests[rows]
        now = select_pages(q, dig, seq_lens, cfg, sel_sc)
        if rerank > 0:
            m = rerank * cfg.num_selected_pages
            now = rerank_pages(now, rr_logits, seq_lens, cfg, m, sc, sel_sc, rerank_score)
        if cfg.selection == "current":
            pages = now.pages
            apply_delta(ls, rows, pages, now.page_scores, all_heads, over)
        else:
            have_spec = ls.spec_len[rows] == seq_lens
            flags, _ = correction_flags(q, ls.prev_query[rows], h, cfg.tau)
            checked = have_spec & ls.has_prev[rows] & over
            corrected = flags & checked.unsqueeze(1)
            redo = corrected | ~have_spec.unsqueeze(1)
            ls.count(rows, "checks", checked.to(torch.int64) * h)
            ls.count(rows, "corrections", corrected.sum(-1))
            pages = torch.where(redo.unsqueeze(-1), now.pages, ls.spec_pages[rows])
            apply_delta(ls, rows, pages, now.page_scores, redo, over)
    ls.count(rows, "steps", over)
    mask = attended_token_mask(pages, seq_lens, length, cfg)
    out, _ = _softmax_out(logits, mask, v, q.dtype)
    if collect_metrics:
        dense_out, dense_probs = _softmax_out(logits, dense_mask, v, q.dtype)
        group = q.shape[1] // h
        qmask = mask.repeat_interleave(group, dim=1)
        mass = (dense_probs * qmask).sum(-1).double()  # [B, H_q]
        err = (out.double() - dense_out.double()).norm(dim=-1) / dense_out.double().norm(
            dim=-1
        ).clamp_min(1e-30)
        w = over.double().unsqueeze(1)
        upd = torch.stack(
            ((mass * w).sum(-1), (err * w).sum(-1), (w * torch.ones_like(mass)).sum(-1)), dim=-1
        )
        ls.metrics.index_add_(0, rows, upd)
    if speculate:
        nxt = seq_lens + 1
        spec = select_pages(q, ls.digests[rows], nxt, cfg, sel_sc)
        if rerank > 0:
            m = rerank * cfg.num_selected_pages
            spec = rerank_pages(spec, rr_logits, nxt, cfg, m, sc, sel_sc, rerank_score)
        apply_delta(ls, rows, spec.pages, spec.page_scores, all_heads, ~fits_budget(nxt, cfg))
        ls.spec_pages[rows] = spec.pages
        ls.spec_len[rows] = nxt
    ls.prev_query[rows] = q.to(ls.prev_query.dtype)
    ls.has_prev[rows] = True
    return out
