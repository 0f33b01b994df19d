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


def _digest_store(n: int, h: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 2, H, D]`` bf16 per-host-page digests (lo <= hi)."""
    x = torch.randn(n, 2, h, d, generator=gen).to(torch.bfloat16)
    return torch.stack((x.amin(1), x.amax(1)), dim=1)


@pytest.mark.parametrize(("p", "sink", "win", "k", "s", "h_q", "h", "d", "red"), CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_select_matches_retrieval_core(p, sink, win, k, s, h_q, h, d, red, masked):
    gen = torch.Generator().manual_seed(1234 + p + k)
    b, r, n_p, n_host = 5, 7, 24, 100
    cfg = FreeKVConfig(
        page_size=p, sink_tokens=sink * p, window_tokens=win * p, selected_pages=k,
        gqa_reduction=red, tau=None,
    )  # fmt: skip
    digests = _digest_store(n_host, h, d, gen)
    rows = torch.tensor([3, 0, 6, 2, 5])
    # Ragged: shorter than the budget, a few candidates, more candidates than K, full store.
    seq_lens = torch.tensor([p * 2 + 1, p * (sink + win + 2), p * 15 + 7, p * n_p, p * 9])
    q = torch.randn(b, h_q, d, generator=gen).to(torch.bfloat16)
    s2p, p2s = _consistent_residency(r, h, s, n_p, gen)
    # Regions share host pages here and there (a shared prefix); all have digests.
    host_pages = torch.randint(0, n_host, (r, n_p), generator=gen)
    slot_tokens = torch.randint(0, 50_000, (r, s), generator=gen)
    head_mask = torch.rand(b, h, generator=gen) < 0.5 if masked else None
    s2p_ref, p2s_ref = s2p.clone(), p2s.clone()

    out = select_pages(
        q, digests, rows, seq_lens, s2p, p2s, host_pages, slot_tokens, page_size=p,
        num_sink_pages=sink, num_window_pages=win, top_k=k, layer=3, reduction=red,
        head_mask=head_mask,
    )  # fmt: skip

    sel = retrieval.select_pages(q, digests[host_pages[rows]], seq_lens, cfg)
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
    # The work list: B*H*S rows, the recalled slots' at (b*H + h)*S + s, -1 elsewhere.
    assert out.work.shape == (b * h * s, 4)
    work = out.work.view(b, h, s, 4).long()
    moved = out.recall >= 0
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


@pytest.mark.parametrize(("p", "sink", "win", "k", "s", "h_q", "h", "d", "red"), CASES)
def test_select_skips_pages_without_a_digest(p, sink, win, k, s, h_q, h, d, red):
    """A candidate page whose host page is < 0 or >= N has no digest: it is scored like a
    non-candidate (-inf, left out of the softmax) and never selected; the rest is the retrieval
    core's selection over the remaining candidates."""
    gen = torch.Generator().manual_seed(99 + p + k)
    b, r, n_p, n_host = 4, 6, 24, 60
    cfg = FreeKVConfig(
        page_size=p, sink_tokens=sink * p, window_tokens=win * p, selected_pages=k,
        gqa_reduction=red, tau=None,
    )  # fmt: skip
    digests = _digest_store(n_host, h, d, gen)
    rows = torch.tensor([5, 1, 0, 3])
    seq_lens = torch.tensor([p * n_p, p * 11 + 2, p * 20, p * (sink + win + k + 1)])
    host_pages = torch.randint(0, n_host, (r, n_p), generator=gen)
    host_pages[rows[0], sink : sink + 3] = -1
    host_pages[rows[1], sink + 1] = n_host
    host_pages[rows[1], sink + 4] = n_host + 1000
    host_pages[rows[2], torch.rand(n_p, generator=gen) < 0.3] = -1
    host_pages[rows[3], : n_p // 2] = -1  # fewer selectable pages than K
    q = torch.randn(b, h_q, d, generator=gen).to(torch.bfloat16)
    s2p = torch.full((r, h, s), -1, dtype=torch.int64)
    p2s = torch.full((r, h, n_p), -1, dtype=torch.int64)
    slot_tokens = torch.arange(r * s).view(r, s) * p

    out = select_pages(
        q, digests, rows, seq_lens, s2p, p2s, host_pages, slot_tokens, page_size=p,
        num_sink_pages=sink, num_window_pages=win, top_k=k, layer=0, reduction=red,
    )  # fmt: skip

    hp = host_pages[rows]
    has_digest = (hp >= 0) & (hp < n_host)
    cand = retrieval.candidate_mask(seq_lens, n_p, cfg) & has_digest
    raw = retrieval.quest_scores(q, digests[hp.clamp(0, n_host - 1)])
    red_want = retrieval.reduce_gqa(raw, cand, h, red, d**-0.5)
    sel_want, _ = retrieval.topk_pages(red_want, k)
    assert torch.equal(out.page_scores, red_want)
    assert torch.equal(out.selected, sel_want)
    no_digest = ~has_digest.unsqueeze(1).expand(b, h, n_p)
    assert bool(torch.isneginf(out.page_scores[no_digest]).all())
    chosen = out.selected[out.selected >= 0]
    assert chosen.numel() > 0
    sel_b = torch.arange(b).view(b, 1, 1).expand_as(out.selected)[out.selected >= 0]
    assert bool(has_digest[sel_b, chosen].all())
    assert bool((out.selected[3] == -1).any()), "the last request must have < K selectable"
    moved = out.work[:, 0] >= 0
    assert bool(((out.work[moved, 0] >= 0) & (out.work[moved, 0] < n_host)).all())


def test_select_refuses_page_to_slot_of_another_page_count():
    h, d, n_p = 2, 64, 10
    with pytest.raises(ValueError, match=r"page_to_slot.shape\[-1\] \(9\) must equal host_pages"):
        select_pages(
            torch.randn(1, 4, d).to(torch.float16), torch.zeros(20, 2, h, d).to(torch.float16),
            torch.tensor([0]), torch.tensor([n_p * 16]), torch.full((1, h, 4), -1),
            torch.full((1, h, n_p - 1), -1), torch.arange(n_p).view(1, n_p),
            torch.arange(4).view(1, 4) * 16, page_size=16, num_sink_pages=1,
            num_window_pages=1, top_k=4, layer=0,
        )  # fmt: skip


def test_select_budget_fit_selects_every_candidate():
    """Exactness invariant: a context within the budget selects all its candidate pages."""
    p, k = 16, 6
    cfg = FreeKVConfig(page_size=p, sink_tokens=p, window_tokens=p, selected_pages=k, tau=None)
    d, h = 64, 2
    digests = torch.randn(10, 2, h, d).to(torch.float16)
    seq = torch.tensor([p * cfg.budget_pages])
    s2p = torch.full((1, h, k), -1)
    p2s = torch.full((1, h, 10), -1)
    out = select_pages(
        torch.randn(1, 4, d).to(torch.float16), digests, torch.tensor([0]), seq, s2p, p2s,
        torch.arange(10).view(1, 10), torch.arange(k).view(1, k) * p, page_size=p,
        num_sink_pages=1, num_window_pages=1, top_k=k, layer=0,
    )  # fmt: skip
    assert sorted(out.selected[0, 0].tolist()) == list(range(1, 1 + k))
    assert int((out.work[:, 0] >= 0).sum()) == h * k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [16, 32])
def test_digest_matches_retrieval_core(dtype, p):
    gen = torch.Generator().manual_seed(7)
    h, d, slots, n_host = 4, 64, 40 * p, 12
    k_buffer = torch.randn(slots, h, d, generator=gen).to(dtype)
    starts = torch.tensor([0, 5 * p, 3, 17 * p])
    pages = torch.tensor([4, 11, 7, -1])
    digests = torch.zeros(n_host, 2, h, d, dtype=dtype)
    page_digest(k_buffer, starts, pages, digests, p, "minmax")
    keys = torch.stack([k_buffer[s : s + p] for s in starts.tolist()])
    want = retrieval.page_digests(keys, "minmax")
    for i in range(3):
        assert torch.equal(digests[pages[i]], want[i])
    assert int((digests != 0).flatten(1).any(-1).sum()) == 3  # the skipped entry wrote nothing
    mean = torch.zeros_like(digests)
    page_digest(k_buffer, starts, pages, mean, p, "mean")
    want_mean = retrieval.page_digests(keys, "mean")
    for i in range(3):
        # float32 sums in a different order, then one rounding to 16 bits
        torch.testing.assert_close(mean[pages[i]], want_mean[i], rtol=1e-2, atol=1e-2)


def test_digest_refuses_a_host_page_beyond_the_store():
    k_buffer = torch.randn(64, 2, 64).to(torch.bfloat16)
    digests = torch.zeros(5, 2, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match=r"pages must be < N = digests.shape\[0\] = 5.*\[5\]"):
        page_digest(k_buffer, torch.tensor([0, 16]), torch.tensor([1, 5]), digests, 16)
    assert not digests.any()


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
        [[4, 0, 1, 0], [-1, 0, 0, 0], [8, 1, 2, 5 * p], [0, 1, 0, 3], [2, 0, 1, 2 * p],
         [-1, -1, -1, -1]],
        dtype=torch.int32,
    )  # fmt: skip
    ev = recall_direct(host, work, kb, vb)
    assert ev is None
    expect_k = [torch.zeros_like(x) for x in kb]
    expect_v = [torch.zeros_like(x) for x in kb]
    for page, layer, head, slot in work.tolist():
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
