"""The ops' pure-torch references (the CPU path of every op) against the retrieval core
(`freekv_sglang.retrieval`) and against direct definitions, on CPU with fixed seeds."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang import retrieval
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import (
    correction_flags,
    page_digest,
    recall_direct,
    select_pages,
)

# These test the references themselves.
pytestmark = pytest.mark.ops_reference


def _consistent_residency(r: int, h: int, s: int, n_p: int, gen: torch.Generator):
    """Random residency with slot_to_page and page_to_slot inverse of each other."""
    s2p = torch.full((r, h, s), -1, dtype=torch.int64)
    p2s = torch.full((r, h, n_p), -1, dtype=torch.int64)
    for i in range(r):
        for j in range(h):
            pages = torch.randperm(n_p, generator=gen)[:s]
            occupied = torch.rand(s, generator=gen) < 0.7
            for slot in range(s):
                if occupied[slot] and slot < pages.numel():
                    s2p[i, j, slot] = pages[slot]
                    p2s[i, j, pages[slot]] = slot
    return s2p, p2s


CASES = [
    # page_size, sink pages, window pages, K, S, H_q, H, D, reduction
    (16, 1, 1, 4, 4, 8, 2, 64, "softmax_mean"),
    (32, 2, 1, 6, 8, 4, 4, 128, "softmax_mean"),
    (16, 0, 2, 5, 7, 12, 3, 64, "mean"),
    (64, 1, 1, 3, 3, 8, 1, 32, "max"),
]


@pytest.mark.parametrize(("p", "sink", "win", "k", "s", "h_q", "h", "d", "red"), CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_select_matches_retrieval_core(p, sink, win, k, s, h_q, h, d, red, masked):
    gen = torch.Generator().manual_seed(1234 + p + k)
    b, r, n_p = 5, 7, 24
    cfg = FreeKVConfig(
        page_size=p, sink_tokens=sink * p, window_tokens=win * p, selected_pages=k,
        gqa_reduction=red, tau=None,
    )  # fmt: skip
    digests = torch.randn(r, n_p, 2, h, d, generator=gen).to(torch.bfloat16)
    digests = torch.stack((digests.amin(2), digests.amax(2)), dim=2)
    rows = torch.tensor([3, 0, 6, 2, 5])
    # Ragged: shorter than the budget, a few candidates, more candidates than K, full store.
    seq_lens = torch.tensor([p * 2 + 1, p * (sink + win + 2), p * 15 + 7, p * n_p, p * 9])
    q = torch.randn(b, h_q, d, generator=gen).to(torch.bfloat16)
    s2p, p2s = _consistent_residency(r, h, s, n_p, gen)
    host_pages = torch.randint(0, 10_000, (r, n_p), generator=gen)
    slot_tokens = torch.randint(0, 50_000, (r, s), generator=gen)
    head_mask = torch.rand(b, h, generator=gen) < 0.5 if masked else None
    s2p_ref, p2s_ref = s2p.clone(), p2s.clone()

    out = select_pages(
        q, digests, rows, seq_lens, s2p, p2s, host_pages, slot_tokens, page_size=p,
        num_sink_pages=sink, num_window_pages=win, top_k=k, layer=3, reduction=red,
        head_mask=head_mask,
    )  # fmt: skip

    sel = retrieval.select_pages(q, digests[rows], seq_lens, cfg)
    delta = retrieval.compute_delta(sel.pages, sel.page_scores, s2p_ref[rows], p2s_ref[rows])
    mask = torch.ones(b, h, dtype=torch.bool) if head_mask is None else head_mask
    m3 = mask.unsqueeze(-1)
    inf = float("-inf")
    assert torch.equal(out.selected, torch.where(m3, sel.pages, -1))
    assert torch.equal(out.page_scores, torch.where(m3, sel.page_scores, inf))
    assert torch.equal(out.recall, torch.where(m3, delta.recall, -1))
    counts = torch.stack((delta.hits, delta.recalled, delta.selected), dim=-1)
    assert torch.equal(out.counts, torch.where(m3, counts, 0))
    assert torch.equal(s2p[rows], torch.where(m3, delta.slot_to_page, s2p_ref[rows]))
    assert torch.equal(p2s[rows], torch.where(m3, delta.page_to_slot, p2s_ref[rows]))
    untouched = torch.ones(r, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(s2p[untouched], s2p_ref[untouched])
    # Work rows: one per recalled slot at (b*H + h)*S + s, -1 elsewhere.
    work = out.work.view(b, h, s, 4).long()
    moved = out.recall >= 0
    assert int(out.num_work) == int(moved.sum())
    assert torch.equal(work[~moved], torch.full_like(work[~moved], -1))
    bi, hi, si = moved.nonzero(as_tuple=True)
    expect = torch.stack(
        (
            host_pages[rows[bi], out.recall[bi, hi, si]],
            torch.full_like(bi, 3),
            hi,
            slot_tokens[rows[bi], si],
        ),
        dim=-1,
    )
    assert torch.equal(work[bi, hi, si], expect)
    assert moved.any(), "the case must recall something"


def test_select_budget_fit_selects_every_candidate():
    """Exactness invariant: a context within the budget selects all its candidate pages."""
    p, k = 16, 6
    cfg = FreeKVConfig(page_size=p, sink_tokens=p, window_tokens=p, selected_pages=k, tau=None)
    d, h = 64, 2
    digests = torch.randn(1, 10, 2, h, d).to(torch.float16)
    seq = torch.tensor([p * cfg.budget_pages])
    s2p = torch.full((1, h, k), -1)
    p2s = torch.full((1, h, 10), -1)
    out = select_pages(
        torch.randn(1, 4, d).to(torch.float16), digests, torch.tensor([0]), seq, s2p, p2s,
        torch.arange(10).view(1, 10), torch.arange(k).view(1, k) * p, page_size=p,
        num_sink_pages=1, num_window_pages=1, top_k=k, layer=0,
    )  # fmt: skip
    assert sorted(out.selected[0, 0].tolist()) == list(range(1, 1 + k))
    assert int(out.num_work) == h * k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [16, 32])
def test_digest_matches_retrieval_core(dtype, p):
    gen = torch.Generator().manual_seed(7)
    h, d, slots = 4, 64, 40 * p
    k_buffer = torch.randn(slots, h, d, generator=gen).to(dtype)
    starts = torch.tensor([0, 5 * p, 3, 17 * p])
    rows = torch.tensor([1, 0, 2, -1])
    pages = torch.tensor([4, 0, 7, 1])
    digests = torch.zeros(3, 8, 2, h, d, dtype=dtype)
    page_digest(k_buffer, starts, rows, pages, digests, p, "minmax")
    keys = torch.stack([k_buffer[s : s + p] for s in starts.tolist()])
    want = retrieval.page_digests(keys, "minmax")
    for i in range(3):
        assert torch.equal(digests[rows[i], pages[i]], want[i])
    assert int((digests != 0).flatten(2).any(-1).sum()) == 3  # the skipped row wrote nothing
    mean = torch.zeros_like(digests)
    page_digest(k_buffer, starts, rows, pages, mean, p, "mean")
    want_mean = retrieval.page_digests(keys, "mean")
    for i in range(3):
        # float32 sums in a different order, then one rounding to 16 bits
        torch.testing.assert_close(mean[rows[i], pages[i]], want_mean[i], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("h_q", "h"), [(8, 8), (32, 8), (12, 3)])
@pytest.mark.parametrize("tau", [0.5, None])
def test_correction_matches_retrieval_core(h_q, h, tau):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(6, h_q, 64, generator=gen).to(torch.bfloat16)
    q_prev = (q.float() + 0.8 * torch.randn(6, h_q, 64, generator=gen)).to(torch.bfloat16)
    q_prev[0, 0] = 0  # a zero query has cosine 0
    flags, c = correction_flags(q, q_prev, h, tau)
    want_flags, want_c = retrieval.correction_flags(q, q_prev, h, tau)
    torch.testing.assert_close(c, want_c, rtol=0, atol=1e-6)
    decided = (want_c - (tau or 0.0)).abs() > 1e-5
    assert torch.equal(flags[decided], want_flags[decided])
    if tau is None:
        assert not flags.any()


def _pool(num_pages, layers, h, p, d, dtype, gen):
    return torch.randn(num_pages, layers, h, 2, p, d, generator=gen).to(dtype)


def test_recall_copies_chunks_into_nhd_slots():
    gen = torch.Generator().manual_seed(3)
    layers, h, p, d = 2, 3, 16, 64
    host = _pool(9, layers, h, p, d, torch.bfloat16, gen)
    kb = [torch.zeros(20 * p, h, d, dtype=torch.bfloat16) for _ in range(layers)]
    vb = [torch.zeros_like(x) for x in kb]
    work = torch.tensor(
        [[4, 0, 1, 0], [-1, 0, 0, 0], [8, 1, 2, 5 * p], [0, 1, 0, 3], [2, 0, 1, 2 * p]],
        dtype=torch.int32,
    )
    ev = recall_direct(host, work, torch.tensor([4], dtype=torch.int32), kb, vb)
    assert ev is None
    expect_k = [torch.zeros_like(x) for x in kb]
    expect_v = [torch.zeros_like(x) for x in kb]
    for page, layer, head, slot in work[:4].tolist():
        if page < 0:
            continue
        expect_k[layer][slot : slot + p, head] = host[page, layer, head, 0]
        expect_v[layer][slot : slot + p, head] = host[page, layer, head, 1]
    for layer in range(layers):
        assert torch.equal(kb[layer], expect_k[layer])
        assert torch.equal(vb[layer], expect_v[layer])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of the loader")
def test_loader_reports_why_it_falls_back():
    from freekv_sglang import ops

    assert ops.load_extension() is None
    assert "cuda" in (ops.load_error() or "").lower()


def test_correction_clamps_the_group_mean():
    q = torch.randn(3, 8, 128).to(torch.float16)
    flags, c = correction_flags(q, -q, 2, -1.0)
    assert bool((c >= -1.0).all()) and not flags.any()
    want_flags, want_c = retrieval.correction_flags(q, -q, 2, -1.0)
    torch.testing.assert_close(c, want_c, rtol=0, atol=1e-6)
    assert torch.equal(flags, want_flags)
