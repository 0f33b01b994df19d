"""`freekv_sglang.attention.rerank_pages`: the two-stage selection study of the reference step.

Both ends of its one parameter have an exact meaning: re-ranking as many pages as the budget
selects keeps the bound's set (only the order may change), and re-ranking every candidate is
a selection by the page's exact best logit, which finds a page the bound ranks last."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.attention import _logits, quantize_keys, rerank_pages
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import build_digests, select_pages

CFG = FreeKVConfig(page_size=4, sink_tokens=4, window_tokens=4, budget_tokens=20, dense_layers=())


def _case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, h, hq, d, length = 2, 2, 4, 16, 64
    k = torch.randn(b, length, h, d, generator=g)
    q = torch.randn(b, hq, d, generator=g)
    seq = torch.tensor([64, 57])
    return q, k, seq, build_digests(k, seq, CFG.page_size, "minmax", length // CFG.page_size)


def test_reranking_the_budget_keeps_the_bounds_pages() -> None:
    q, k, seq, dig = _case(0)
    sel = select_pages(q, dig, seq, CFG)
    sc = q.shape[-1] ** -0.5
    rr = rerank_pages(sel, _logits(q, k, sc), seq, CFG, CFG.num_selected_pages, sc, sc)
    for b in range(2):
        for h in range(2):
            assert set(rr.pages[b, h].tolist()) == set(sel.pages[b, h].tolist())


def test_reranking_every_candidate_selects_by_the_exact_best_logit() -> None:
    q, k, seq, _ = _case(1)
    sc = q.shape[-1] ** -0.5
    # KV head 0 of request 0: every key but one has no component along the group's two
    # queries (exact logits 0) yet large ones elsewhere, so every box is wide; page 6 holds
    # only a key aligned with both queries. The bound ranks the wide boxes above page 6.
    k = k.clone()
    basis, _ = torch.linalg.qr(q[0, :2].T)  # [D, 2]
    wide = k[0, :, 0] * 5
    k[0, :, 0] = wide - (wide @ basis) @ basis.T
    k[0, 24:28, 0] = 0.0
    k[0, 25, 0] = q[0, :2].sum(0) * 0.5
    dig = build_digests(k, seq, CFG.page_size, "minmax", 16)
    sel = select_pages(q, dig, seq, CFG)
    assert 6 not in sel.pages[0, 0].tolist()
    logits = _logits(q, k, sc)
    rr = rerank_pages(sel, logits, seq, CFG, 16, sc, sc)
    assert rr.pages[0, 0, 0].item() == 6
    # The exact ranking, computed directly: the top pages by the group's softmax of best logits.
    raw = (logits / sc)[0, 0].reshape(2, 16, 4).amax(-1)  # [G, P]
    cand = torch.zeros(16, dtype=torch.bool)
    cand[1 : 16 - 1] = True
    p = torch.softmax(torch.where(cand, raw, float("-inf")) * sc, -1).mean(0)
    want = torch.topk(torch.where(cand, p, float("-inf")), CFG.num_selected_pages).indices
    assert set(rr.pages[0, 0].tolist()) == set(want.tolist())


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_keys_stay_within_half_a_step_of_their_page_range(bits: int) -> None:
    """Per page, KV head and channel: the min and max come back exactly, every key within half
    a level of itself, at most ``2 ** bits`` distinct values; a partial last page too."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 70, 2, 8, generator=g)  # 70 tokens: 4 pages of 16 and a partial one
    got = quantize_keys(k, 16, bits)
    assert got.shape == k.shape and got.dtype == torch.float32
    pad = torch.cat((k, k[:, -1:].expand(2, 10, 2, 8)), dim=1).view(2, 5, 16, 2, 8)
    lo, hi = pad.amin(2), pad.amax(2)
    q = got.view(2, -1, 2, 8)
    q = torch.cat((q, q[:, -1:].expand(2, 10, 2, 8)), dim=1).view(2, 5, 16, 2, 8)
    torch.testing.assert_close(q.amin(2), lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.amax(2), hi, rtol=0, atol=1e-6)
    step = (hi - lo) / (2**bits - 1)
    assert bool(((q - pad).abs() <= step.unsqueeze(2) / 2 + 1e-6).all())
    levels = q.permute(0, 1, 3, 4, 2).reshape(-1, 16)
    assert max(len(set(row.tolist())) for row in levels) <= 2**bits


def test_reranking_by_mass_ranks_every_candidate_by_its_attention() -> None:
    """``score="mass"`` over every candidate: the group softmax then weighs each page by its
    tokens' summed attention over the candidates' tokens, so the selection is the top pages by
    the group-mean attention mass computed directly (what the oracle ranks by, over the
    candidates)."""
    q, k, seq, dig = _case(4)
    sc = q.shape[-1] ** -0.5
    logits = _logits(q, k, sc)
    rr = rerank_pages(select_pages(q, dig, seq, CFG), logits, seq, CFG, 16, sc, sc, "mass")
    cand = torch.zeros(16, dtype=torch.bool)
    cand[1 : 16 - 1] = True  # sink 1 page, window 1 page, 64 tokens
    tok = cand.repeat_interleave(4)
    probs = torch.softmax(torch.where(tok, logits[0, 0], float("-inf")), -1)  # [G, L]
    mass = probs.reshape(2, 16, 4).sum(-1).mean(0)  # [P]
    torch.testing.assert_close(rr.page_scores[0, 0][cand], mass[cand], rtol=1e-5, atol=1e-7)
    want = torch.topk(torch.where(cand, mass, float("-inf")), CFG.num_selected_pages).indices
    assert set(rr.pages[0, 0].tolist()) == set(want.tolist())
    with pytest.raises(ValueError, match="score must be"):
        rerank_pages(select_pages(q, dig, seq, CFG), logits, seq, CFG, 16, sc, sc, "sum")


def test_reranking_by_share_over_every_candidate_is_the_oracle() -> None:
    """``score="share"`` over every candidate normalises each query head over every token the
    request has (sink, window and all candidates) and sums over the group: the dense softmax
    mass the oracle ranks by, page for page, on both requests (one with a partial last page)."""
    from freekv_sglang.attention import oracle_pages

    q, k, seq, dig = _case(5)
    sc = q.shape[-1] ** -0.5
    logits = _logits(q, k, sc)
    rr = rerank_pages(select_pages(q, dig, seq, CFG), logits, seq, CFG, 16, sc, sc, "share")
    valid = torch.arange(64) < seq.view(2, 1, 1, 1)
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)
    want = oracle_pages(probs, seq, 16, CFG)
    for b in range(2):
        for h in range(2):
            assert set(rr.pages[b, h].tolist()) == set(want.pages[b, h].tolist()), (b, h)
    cand = torch.isfinite(want.page_scores)
    assert torch.equal(torch.isfinite(rr.page_scores), cand)
    torch.testing.assert_close(rr.page_scores[cand].exp(), want.page_scores[cand], rtol=1e-5,
                               atol=1e-7)  # fmt: skip
