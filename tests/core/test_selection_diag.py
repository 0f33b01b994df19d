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


def test_depth_counts_the_oracles_pages_within_the_bounds_best() -> None:
    """One step of random keys: at ``R = 1`` the share of the oracle's ``k`` pages among the
    bound's best ``k`` is their overlap, computed directly; a depth that holds every candidate
    holds all of them; `depth` averages the records and counts needle pages by their rank."""
    from freekv_sglang.config import FreeKVConfig
    from freekv_sglang.retrieval import candidate_mask

    g = torch.Generator().manual_seed(7)
    h_q, h, d, p, seq_len = 4, 2, 16, 16, 259
    q = torch.randn(h_q, d, generator=g)
    keys = torch.randn(seq_len, h, d, generator=g)
    cfg = FreeKVConfig(page_size=p, sink_tokens=32, window_tokens=32, selected_pages=1)
    splits = [("32/32", cfg, {160: 6})]  # k = (160 - 64) / 16
    recs = diag.analyse_step(q, keys, seq_len, [113], splits, d**-0.5)
    n_p, n_all = seq_len // p, -(-seq_len // p)
    cand = candidate_mask(torch.tensor([seq_len]), n_all, cfg)[0, :n_p]
    box = diag._reduce(diag.page_scores(q, keys, p)["box"], cand, h, "sm_sqrt", d)
    probs = torch.softmax(torch.einsum("gd,lgd->gl", q, keys.repeat_interleave(2, 1)) * d**-0.5, -1)
    mass = torch.nn.functional.pad(probs, (0, n_all * p - seq_len)).view(h_q, n_all, p).sum(-1)
    mass = mass.view(h, 2, n_all).sum(1)[:, :n_p]
    for hh, rec in enumerate(recs):
        got = rec["32/32"][diag.TURNOVER_KEY]["oracle_depth_160"]
        oracle = set(torch.where(cand, mass[hh], -1.0).topk(6).indices.tolist())
        bound = set(box[hh].topk(6).indices.tolist())
        assert got[1] == len(oracle & bound) / 6, hh
        assert got[max(diag.DEPTHS)] == 1.0
        rec.update(case="c", step=0, layer=1)
    rows = {r["depth"]: r for r in diag.depth(recs, splits)}  # type: ignore[arg-type]
    want = sum(r["32/32"][diag.TURNOVER_KEY]["oracle_depth_160"][1] for r in recs) / len(recs)
    assert rows[1]["oracle_pages_within"] == want and rows[1]["candidates"] == 6
    retr = [r for r in recs if r["32/32"]["oracle/sum"]["rank"] <= diag.RETRIEVAL_TOP]
    assert retr, "the needle page (token 113, page 7) is within the top 12 of 12 candidates"
    ranks = [r["32/32"][diag.TURNOVER_KEY]["rank"] for r in retr]
    assert rows[1]["needle_within_retrieval"] == sum(x <= 6 for x in ranks) / len(ranks)
