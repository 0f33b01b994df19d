"""Retrieval math against brute-force loops: digests, Quest scores, GQA reduction, top-k,
candidates, the dense-while-it-fits rule, the delta against the resident set, correction."""

from __future__ import annotations

import math

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import (
    build_digests,
    candidate_mask,
    compute_delta,
    correction_flags,
    fits_budget,
    page_digests,
    quest_scores,
    reduce_gqa,
    select_pages,
    topk_pages,
    update_digests,
)

CFG = FreeKVConfig(
    page_size=4, sink_tokens=4, window_tokens=8, selected_pages=3, dense_layers=(), tau=0.8
)


def _brute_reduced(q, keys, seq_len, cfg, h, reduction, scale):
    """Per KV head, the reduced score of every page of one request, with python loops."""
    p = cfg.page_size
    n_pages = math.ceil(seq_len / p)
    cands = [j for j in range(cfg.num_sink_pages, n_pages - cfg.num_window_pages)]
    h_q, d = q.shape
    group = h_q // h
    out = {}
    for kv in range(h):
        per_q = []
        for g in range(kv * group, (kv + 1) * group):
            row = {}
            for j in cands:
                page = keys[j * p : (j + 1) * p, kv].double()
                lo, hi = page.min(0).values, page.max(0).values
                qd = q[g].double()
                row[j] = float(sum(max(qd[i] * hi[i], qd[i] * lo[i]) for i in range(d)))
            per_q.append(row)
        red = {}
        for j in cands:
            vals = [r[j] for r in per_q]
            if reduction == "mean":
                red[j] = sum(vals) / group
            elif reduction == "max":
                red[j] = max(vals)
            else:
                acc = 0.0
                for r in per_q:
                    m = max(r.values())
                    z = sum(math.exp(scale * (x - m)) for x in r.values())
                    acc += math.exp(scale * (r[j] - m)) / z
                red[j] = acc / group
        out[kv] = red
    return out


@pytest.mark.parametrize("reduction", ["softmax_mean", "mean", "max"])
def test_topk_equals_brute_force(reduction: str) -> None:
    cfg = FreeKVConfig(
        page_size=4, sink_tokens=4, window_tokens=8, selected_pages=3, gqa_reduction=reduction
    )
    gen = torch.Generator().manual_seed(1)
    b, h, group, d, length = 3, 2, 3, 8, 64
    keys = torch.randn(b, length, h, d, generator=gen)
    q = torch.randn(b, h * group, d, generator=gen)
    seq_lens = torch.tensor([64, 37, 13])
    dig = build_digests(keys, seq_lens, cfg.page_size, max_pages=20)
    sel = select_pages(q, dig, seq_lens, cfg, scale=0.3)
    for r in range(b):
        ref = _brute_reduced(q[r], keys[r], int(seq_lens[r]), cfg, h, reduction, 0.3)
        for kv in range(h):
            ranked = sorted(ref[kv], key=lambda j: -ref[kv][j])[:3]
            got = [int(x) for x in sel.pages[r, kv] if x >= 0]
            assert got == ranked, (r, kv, got, ranked)
            for j, val in ref[kv].items():
                assert sel.page_scores[r, kv, j].item() == pytest.approx(val, rel=1e-4, abs=1e-6)
            cand = set(ref[kv])
            for j in range(20):
                if j not in cand:
                    assert sel.page_scores[r, kv, j].item() == float("-inf")


def test_short_selection_is_padded_with_minus_one() -> None:
    # 13 tokens = 4 pages: sink page 0, window pages 2..3, one candidate (page 1).
    keys = torch.randn(1, 13, 1, 4)
    dig = build_digests(keys, torch.tensor([13]), 4, max_pages=8)
    sel = select_pages(torch.randn(1, 2, 4), dig, torch.tensor([13]), CFG)
    assert sel.pages.tolist() == [[[1, -1, -1]]]
    vals = topk_pages(torch.full((1, 1, 2), float("-inf")), 3)
    assert vals[0].tolist() == [[[-1, -1, -1]]]


def test_digests_minmax_and_mean() -> None:
    keys = torch.randn(5, 4, 2, 3)
    dig = page_digests(keys, "minmax")
    assert torch.equal(dig[:, 0], keys.amin(1)) and torch.equal(dig[:, 1], keys.amax(1))
    mean = page_digests(keys, "mean")
    torch.testing.assert_close(mean[:, 0], keys.mean(1))
    assert torch.equal(mean[:, 0], mean[:, 1])
    with pytest.raises(ValueError, match="digest kind"):
        page_digests(keys, "median")


def test_build_digests_only_full_pages_and_incremental_update_agrees() -> None:
    b, length, h, d, p = 3, 30, 2, 4, 4
    keys = torch.randn(b, length, h, d)
    seq_lens = torch.tensor([30, 9, 3])
    dig = build_digests(keys, seq_lens, p, max_pages=10)
    assert dig.shape == (b, 10, 2, h, d)
    for r, n_full in enumerate([7, 2, 0]):
        for j in range(10):
            if j < n_full:
                pk = keys[r, j * p : (j + 1) * p]
                assert torch.equal(dig[r, j, 0], pk.amin(0))
                assert torch.equal(dig[r, j, 1], pk.amax(0))
            else:
                assert not dig[r, j].any()
    # Incremental: grow every request one token at a time from 1; after each step the store
    # must hold the same digests as a full build at that length.
    store = torch.zeros(6, 10, 2, h, d)
    rows = torch.tensor([5, 0, 3])
    lens = torch.ones(b, dtype=torch.int64)
    for _ in range(29):
        lens = torch.minimum(lens + 1, seq_lens.clamp(min=1))
        update_digests(store, rows, keys, lens, p)
        assert torch.equal(store[rows], build_digests(keys, lens, p, max_pages=10))


def test_quest_scores_bound_the_true_logits() -> None:
    # The Quest score of a page is an upper bound of q.k for every key in it.
    keys = torch.randn(2, 32, 2, 8)
    q = torch.randn(2, 4, 8)
    dig = build_digests(keys, torch.tensor([32, 32]), 8)
    s = quest_scores(q, dig)
    kv = keys.repeat_interleave(2, dim=2)  # [B, L, H_q, D]
    logits = torch.einsum("bgd,blgd->bgl", q, kv).view(2, 4, 4, 8).amax(-1)
    assert (s >= logits - 1e-5).all()


def test_candidates_and_fit_rule() -> None:
    seq = torch.tensor([1, 12, 13, 24, 25, 40])
    cand = candidate_mask(seq, 10, CFG)
    n_pages = [1, 3, 4, 6, 7, 10]
    for r, n in enumerate(n_pages):
        want = [1 <= j < n - 2 for j in range(10)]
        assert cand[r].tolist() == want
    # budget = 1 sink + 3 selected + 2 window pages = 24 tokens
    assert fits_budget(seq, CFG).tolist() == [True, True, True, True, False, False]
    # while it fits, candidates never outnumber the selected pages
    assert (cand.sum(-1)[fits_budget(seq, CFG)] <= CFG.num_selected_pages).all()


def _check_maps(s2p: torch.Tensor, p2s: torch.Tensor) -> None:
    b, h, s = s2p.shape
    for r in range(b):
        for kv in range(h):
            for slot in range(s):
                page = int(s2p[r, kv, slot])
                if page >= 0:
                    assert int(p2s[r, kv, page]) == slot
            for page in range(p2s.shape[-1]):
                slot = int(p2s[r, kv, page])
                if slot >= 0:
                    assert int(s2p[r, kv, slot]) == page


def test_delta_is_minimal_and_consistent_over_random_steps() -> None:
    gen = torch.Generator().manual_seed(3)
    b, h, n_p, k = 4, 3, 24, 5
    s2p = torch.full((b, h, k), -1, dtype=torch.int64)
    p2s = torch.full((b, h, n_p), -1, dtype=torch.int64)
    for step in range(60):
        scores = torch.randn(b, h, n_p, generator=gen)
        # random candidate count per (request, head), sometimes below k
        n_cand = torch.randint(0, n_p, (b, h), generator=gen)
        cand = torch.arange(n_p) < n_cand.unsqueeze(-1)
        if step % 7 == 0:
            cand[:] = True
        scores = torch.where(cand, scores, float("-inf"))
        sel, _ = topk_pages(scores, k)
        d = compute_delta(sel, scores, s2p, p2s)
        for r in range(b):
            for kv in range(h):
                before = {int(x) for x in s2p[r, kv] if x >= 0}
                chosen = [int(x) for x in sel[r, kv] if x >= 0]
                after = {int(x) for x in d.slot_to_page[r, kv] if x >= 0}
                loads = [(i, int(x)) for i, x in enumerate(d.recall[r, kv]) if x >= 0]
                # every selected page is resident afterwards
                assert set(chosen) <= after
                # only missing selected pages are loaded, each once: nothing resident recalled
                assert sorted(p for _, p in loads) == sorted(set(chosen) - before)
                # slots of selected, already-resident pages are untouched
                for i, x in enumerate(s2p[r, kv]):
                    if int(x) in chosen:
                        assert int(d.slot_to_page[r, kv, i]) == int(x)
                # recall describes exactly the changed slots
                for i in range(k):
                    if int(d.recall[r, kv, i]) >= 0:
                        assert int(d.slot_to_page[r, kv, i]) == int(d.recall[r, kv, i])
                    else:
                        assert int(d.slot_to_page[r, kv, i]) == int(s2p[r, kv, i])
                # never more than the budget resident, no duplicates
                assert len(after) == len([x for x in d.slot_to_page[r, kv] if x >= 0]) <= k
                assert int(d.hits[r, kv]) == len(set(chosen) & before)
                assert int(d.recalled[r, kv]) == len(loads)
                assert int(d.selected[r, kv]) == len(chosen)
                # victims: empty slots first, then the lowest-scoring unselected residents
                victims = [int(s2p[r, kv, i]) for i, _ in loads]
                survivors = after - set(chosen)
                empties = [v for v in victims if v < 0]
                if any(v >= 0 for v in victims):
                    assert len(empties) == sum(1 for x in s2p[r, kv] if x < 0)
                for v in victims:
                    if v >= 0:
                        for keep in survivors:
                            assert scores[r, kv, v] <= scores[r, kv, keep]
        _check_maps(d.slot_to_page, d.page_to_slot)
        s2p, p2s = d.slot_to_page, d.page_to_slot


def test_delta_of_the_same_selection_recalls_nothing() -> None:
    scores = torch.randn(2, 2, 10)
    sel, _ = topk_pages(scores, 4)
    s2p = torch.full((2, 2, 4), -1, dtype=torch.int64)
    p2s = torch.full((2, 2, 10), -1, dtype=torch.int64)
    first = compute_delta(sel, scores, s2p, p2s)
    assert first.recalled.tolist() == [[4, 4], [4, 4]]
    again = compute_delta(sel, scores, first.slot_to_page, first.page_to_slot)
    assert again.recalled.sum() == 0 and (again.recall == -1).all()
    assert again.hits.tolist() == [[4, 4], [4, 4]]
    assert torch.equal(again.slot_to_page, first.slot_to_page)


@pytest.mark.parametrize("tau", [None, -1.0, 0.0, 0.5, 0.8, 0.9, 1.0])
def test_correction_fires_exactly_when_group_mean_cosine_is_below_tau(tau: float | None) -> None:
    gen = torch.Generator().manual_seed(5)
    b, h, group, d = 6, 3, 3, 16
    q_prev = torch.randn(b, h * group, d, generator=gen)
    noise = torch.randn(b, h * group, d, generator=gen)
    mix = torch.linspace(0.0, 3.0, b).view(b, 1, 1)
    q = q_prev + mix * noise
    flags, c = correction_flags(q, q_prev, h, tau)
    for r in range(b):
        for kv in range(h):
            cs = []
            for g in range(kv * group, (kv + 1) * group):
                a, bb = q[r, g].double(), q_prev[r, g].double()
                cs.append(float(a @ bb / (a.norm() * bb.norm())))
            mean_c = sum(cs) / group
            assert c[r, kv].item() == pytest.approx(mean_c, abs=1e-5)
            want = False if tau is None else mean_c < tau
            if tau is not None and abs(mean_c - tau) < 1e-5:
                continue  # too close to the threshold to assert in float32
            assert bool(flags[r, kv]) == want
    if tau is not None:
        assert torch.equal(flags, c < tau)
    # identical queries never fire below tau = 1 - eps; tau = -1 never fires
    same, _ = correction_flags(q_prev, q_prev, h, 0.999)
    assert not same.any()
    never, _ = correction_flags(-q_prev, q_prev, h, -1.0)
    assert not never.any()
    opposite, _ = correction_flags(-q_prev, q_prev, h, 0.0)
    assert opposite.all()


def test_reduce_gqa_masks_non_candidates_and_rows_without_candidates() -> None:
    scores = torch.randn(2, 4, 6)
    cand = torch.zeros(2, 6, dtype=torch.bool)
    cand[0, 2:4] = True
    for red in ("softmax_mean", "mean", "max"):
        out = reduce_gqa(scores, cand, 2, red, 0.5)
        assert torch.isneginf(out[1]).all()
        assert torch.isneginf(out[0, :, [0, 1, 4, 5]]).all()
        assert torch.isfinite(out[0, :, 2:4]).all()
    sm = reduce_gqa(scores, cand, 2, "softmax_mean", 0.5)
    torch.testing.assert_close(sm[0, :, 2:4].sum(-1), torch.ones(2))


@pytest.mark.parametrize("length", [32, 30])
def test_digests_of_a_strided_hnd_view_equal_the_contiguous_ones(length: int) -> None:
    hnd = torch.randn(2, 3, length, 8)  # [B, H, L, D] storage seen as [B, L, H, D]
    view = hnd.transpose(1, 2)
    seq = torch.tensor([length, 17])
    assert torch.equal(build_digests(view, seq, 4), build_digests(view.contiguous(), seq, 4))
    store_a = torch.zeros(2, 8, 2, 3, 8)
    store_b = torch.zeros(2, 8, 2, 3, 8)
    update_digests(store_a, torch.tensor([0, 1]), view, seq, 4)
    update_digests(store_b, torch.tensor([0, 1]), view.contiguous(), seq, 4)
    assert torch.equal(store_a, store_b)


def test_mean_digest_scores_are_dot_products_with_the_mean_key() -> None:
    keys = torch.randn(1, 24, 2, 8)
    q = torch.randn(1, 4, 8)
    dig = build_digests(keys, torch.tensor([24]), 8, kind="mean")
    s = quest_scores(q, dig)
    means = keys.view(1, 3, 8, 2, 8).mean(2)  # [B, P, H, D]
    want = torch.einsum("bgd,bpgd->bgp", q, means.repeat_interleave(2, dim=2))
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-5)


def test_topk_ties_go_to_the_lower_page() -> None:
    """Equal scores (softmax probabilities that underflowed to zero, say) are taken in page
    order, the select kernel's rule; ``-inf`` (non-candidates) are never taken."""
    reduced = torch.tensor([[[0.5, 0.0, 0.0, 0.9, 0.0, float("-inf")]]])
    pages, scores = topk_pages(reduced, 4)
    assert pages.tolist() == [[[3, 0, 1, 2]]]
    torch.testing.assert_close(scores, torch.tensor([[[0.9, 0.5, 0.0, 0.0]]]), rtol=0, atol=0)
    pages, scores = topk_pages(reduced, 7)
    assert pages.tolist() == [[[3, 0, 1, 2, 4, -1, -1]]]
    assert torch.isneginf(scores[0, 0, 5:]).all()
