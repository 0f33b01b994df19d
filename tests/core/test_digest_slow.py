"""The ``minmax_slow`` digest kind: Quest's bound over the slower half of the rotary pairs,
against a brute-force computation, through the same score formula and selection."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import build_digests, page_digests, quest_scores, select_pages


def test_minmax_slow_scores_equal_brute_force_over_slow_pairs() -> None:
    torch.manual_seed(7)
    b, p, n_p, h, g, d = 2, 8, 6, 2, 3, 16
    keys = torch.randn(b, n_p * p, h, d)
    q = torch.randn(b, h * g, d)
    lens = torch.tensor([n_p * p, n_p * p - 3])
    dig = build_digests(keys, lens, p, kind="minmax_slow")
    s = quest_scores(q, dig)
    slow = [i for i in range(d) if i % (d // 2) >= d // 4]  # pairs 4..7 of (i, i + 8)
    for bi in range(b):
        full = int(lens[bi]) // p
        for gi in range(h * g):
            for j in range(n_p):
                if j >= full:  # not a full page: zero digest, zero score
                    assert s[bi, gi, j] == 0
                    continue
                page = keys[bi, j * p : (j + 1) * p, gi // g]  # [p, D]
                want = sum(
                    max(float(q[bi, gi, i]) * float(page[:, i].min()),
                        float(q[bi, gi, i]) * float(page[:, i].max()))
                    for i in slow
                )  # fmt: skip
                assert abs(float(s[bi, gi, j]) - want) < 1e-4
    # The faster half's dimensions are zero in both lo and hi, the slower half is the box.
    mm = page_digests(keys[0].view(n_p, p, h, d), "minmax")
    sl = page_digests(keys[0].view(n_p, p, h, d), "minmax_slow")
    fast = [i for i in range(d) if i not in slow]
    assert torch.equal(sl[..., slow], mm[..., slow]) and not sl[..., fast].any()
    cfg = FreeKVConfig(
        page_size=p, sink_tokens=p, window_tokens=p, selected_pages=2, digest_kind="minmax_slow"
    )
    sel = select_pages(q, dig, lens, cfg)
    assert sel.pages.shape == (b, h, 2) and (sel.pages >= 1).all()


def test_minmax_slow_needs_head_dim_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        page_digests(torch.randn(2, 4, 1, 6), "minmax_slow")
