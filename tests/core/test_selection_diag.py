"""The page scores of benchmarks/bench_selection_diag.py against their definitions: the box
equals `quest_scores`, each bound is at least the page's best logit, the tighter bounds are
tighter, and the needle's tokens are found."""

from __future__ import annotations

import torch

from benchmarks import bench_selection_diag as diag
from freekv_sglang.retrieval import build_digests, quest_scores


def test_page_scores_match_definitions_and_bound_order() -> None:
    torch.manual_seed(0)
    h_q, h, d, p, n_p = 6, 2, 16, 32, 5
    q = torch.randn(h_q, d)
    keys = torch.randn(n_p * p + 7, h, d)  # a partial last page is ignored
    s = diag.page_scores(q, keys, p)
    assert all(v.shape == (h_q, n_p) for v in s.values())
    dig = build_digests(keys[None], torch.tensor([keys.shape[0]]), p)[:, :n_p]
    torch.testing.assert_close(s["box"], quest_scores(q[None], dig)[0])
    g = h_q // h
    pages = keys[: n_p * p].reshape(n_p, p, h, d)
    logits = torch.einsum("gd,ptgd->gpt", q, pages.repeat_interleave(g, dim=2))
    torch.testing.assert_close(s["exact_max"], logits.amax(-1))
    means = pages.mean(1).repeat_interleave(g, dim=1)  # [P, H_q, D]
    torch.testing.assert_close(s["mean_key"], torch.einsum("gd,pgd->gp", q, means))
    # Brute force of the pair-norm bound and of the 2 keys of largest norm.
    half = d // 2
    for gi in range(h_q):
        kv = gi // g
        for j in range(n_p):
            k = pages[j, :, kv]
            kn = torch.sqrt(k[:, :half] ** 2 + k[:, half:] ** 2).amax(0)
            qn = torch.sqrt(q[gi, :half] ** 2 + q[gi, half:] ** 2)
            assert torch.isclose(s["pair_norm"][gi, j], (qn * kn).sum(), rtol=1e-5)
            top2 = k.norm(dim=-1).topk(2).indices
            assert torch.isclose(s["rep2"][gi, j], (k[top2] @ q[gi]).max(), rtol=1e-5)
    eps = 1e-4
    assert (s["pair_min"] >= s["exact_max"] - eps).all()
    assert (s["pair_min"] <= s["box"] + eps).all()
    assert (s["pair_min"] <= s["pair_norm"] + eps).all()
    assert (s["sub8"] >= s["exact_max"] - eps).all()
    assert (s["sub8"] <= s["sub16"] + eps).all() and (s["sub16"] <= s["box"] + eps).all()
    assert (s["rep2"] <= s["rep4"] + eps).all() and (s["rep4"] <= s["exact_max"] + eps).all()
    torch.testing.assert_close(s["box_lo_half"] + s["box_hi_half"], s["box"])


def test_ranks_are_stable_and_put_non_candidates_last() -> None:
    red = torch.tensor([[0.5, float("-inf"), 0.5, 0.9, 0.1]])
    assert diag._ranks(red).tolist() == [[1, 4, 2, 0, 3]]


def test_turnover_counts_the_candidates_new_since_the_previous_step() -> None:
    """Two steps of one (case, layer, head): 1 of 2 selected pages new, 1 of 4 candidates at
    R = 2, none at R = 4; a head's first step is not counted."""
    key = diag.TURNOVER_KEY

    def rec(step: int, cands: dict[int, list[int]]) -> dict[str, object]:
        return {
            "case": "c",
            "layer": 1,
            "head": 0,
            "step": step,
            "64/64": {key: {"cand_512": cands}},
        }

    records = [
        rec(0, {1: [3, 5], 2: [3, 5, 7, 9], 4: [1, 2, 3, 5, 7, 9, 10, 11]}),
        rec(1, {1: [3, 7], 2: [3, 5, 7, 8], 4: [1, 2, 3, 5, 7, 9, 10, 11]}),
    ]
    splits = [("64/64", None, {512: 2})]
    rows = {r["depth"]: r for r in diag.turnover(records, splits)}  # type: ignore[arg-type]
    assert rows[1]["new_share"] == 0.5 and rows[1]["new_per_head_step"] == 1.0
    assert rows[2]["new_share"] == 0.25 and rows[2]["candidates"] == 4
    assert rows[4]["new_share"] == 0.0 and rows[4]["head_steps"] == 1
