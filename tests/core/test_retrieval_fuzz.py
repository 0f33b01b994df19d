"""Property tests (hypothesis) of the selection math in `freekv_sglang.retrieval` and of
`freekv_sglang.attention.apply_delta`, each checked against a brute-force reference.

Settings are derandomized with fixed example counts, so every run (and CI) draws the same
examples; the whole module takes well under a minute on two cores. Inputs are small
(a few requests, heads, pages) so that the reference loops stay cheap and every corner of the
page geometry (no candidate, fewer candidates than ``k``, exactly ``k``, many) is reached.

Exactness: with ``gqa_reduction="max"``, min/max digests and small-integer queries and keys,
every score is an exactly representable float32, so top-k is checked exactly (ties included:
ties may be broken either way, but a selected page never scores below an unselected candidate).
``"mean"`` and ``"softmax_mean"`` scores (and mean digests) are compared to a float64 reference
with a stated tolerance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freekv_sglang.attention import apply_delta
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import (
    build_digests,
    candidate_mask,
    compute_delta,
    correction_flags,
    fits_budget,
    num_pages,
    page_digests,
    quest_scores,
    select_pages,
)
from freekv_sglang.state import COUNTER_NAMES, LayerState

FUZZ = settings(
    derandomize=True,
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Tolerance of float32 softmax scores against the float64 reference (values are in [0, 1]).
SOFTMAX_ATOL = 1e-5


@st.composite
def geometry(draw: st.DrawFn) -> dict:
    """A config and a ragged batch shape whose lengths span every candidate count."""
    page = draw(st.integers(1, 4))
    sink = draw(st.integers(0, 2))
    window = draw(st.integers(1, 2))
    k = draw(st.integers(1, 4))
    h = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    d = draw(st.integers(1, 6))
    b = draw(st.integers(1, 3))
    max_pages = sink + window + k + draw(st.integers(0, 5))
    seq_lens = draw(st.lists(st.integers(1, max_pages * page), min_size=b, max_size=b))
    cfg = FreeKVConfig(
        page_size=page,
        sink_tokens=sink * page,
        window_tokens=window * page,
        selected_pages=k,
        dense_layers=(),
        gqa_reduction=draw(st.sampled_from(["softmax_mean", "mean", "max"])),
        digest_kind=draw(st.sampled_from(["minmax", "mean"])),
    )
    return {"cfg": cfg, "b": b, "h": h, "hq": h * group, "d": d, "seq_lens": seq_lens}


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _ints(seed: int, shape: tuple[int, ...], lo: int = -3, hi: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(torch.float32)


def _candidates(seq_len: int, cfg: FreeKVConfig) -> list[int]:
    n = -(-seq_len // cfg.page_size)
    return list(range(cfg.num_sink_pages, n - cfg.num_window_pages))


def _reference_reduced(
    q: torch.Tensor, dig: torch.Tensor, seq_len: int, cfg: FreeKVConfig, h: int, scale: float
) -> list[dict[int, float]]:
    """Per KV head: candidate page -> reduced score, in float64 Python arithmetic.

    ``q [H_q, D]``, ``dig [P, 2, H, D]`` of one request."""
    hq, d = q.shape
    group = hq // h
    cands = _candidates(seq_len, cfg)
    out = []
    for kv in range(h):
        per_head: list[dict[int, float]] = []
        for g in range(kv * group, (kv + 1) * group):
            raw = {}
            for j in cands:
                raw[j] = sum(
                    max(
                        float(q[g, i]) * float(dig[j, 0, kv, i]),
                        float(q[g, i]) * float(dig[j, 1, kv, i]),
                    )
                    for i in range(d)
                )
            per_head.append(raw)
        red: dict[int, float] = {}
        for j in cands:
            vals = [r[j] for r in per_head]
            if cfg.gqa_reduction == "max":
                red[j] = max(vals)
            elif cfg.gqa_reduction == "mean":
                red[j] = sum(vals) / group
            else:
                probs = []
                for r in per_head:
                    m = max(r.values())
                    z = sum(math.exp(scale * (v - m)) for v in r.values())
                    probs.append(math.exp(scale * (r[j] - m)) / z)
                red[j] = sum(probs) / group
        out.append(red)
    return out


@FUZZ
@given(geo=geometry(), seed=st.integers(0, 2**31 - 1))
def test_select_pages_is_topk_of_candidates(geo: dict, seed: int) -> None:
    cfg: FreeKVConfig = geo["cfg"]
    b, h, hq, d = geo["b"], geo["h"], geo["hq"], geo["d"]
    seq_lens = torch.tensor(geo["seq_lens"], dtype=torch.int64)
    length = int(seq_lens.max())
    keys = _ints(seed, (b, length, h, d))
    q = _ints(seed + 1, (b, hq, d))
    dig = build_digests(keys, seq_lens, cfg.page_size, cfg.digest_kind)
    scale = 0.5
    sel = select_pages(q, dig, seq_lens, cfg, scale)
    k = cfg.num_selected_pages
    assert sel.pages.shape == (b, h, k) and sel.pages.dtype == torch.int64
    exact = cfg.gqa_reduction == "max" and cfg.digest_kind == "minmax"
    for r in range(b):
        ref = _reference_reduced(q[r], dig[r], int(seq_lens[r]), cfg, h, scale)
        cands = _candidates(int(seq_lens[r]), cfg)
        for kv in range(h):
            pages = sel.pages[r, kv].tolist()
            n_valid = min(k, len(cands))
            # -1 padding only when fewer candidates than k exist, and it trails.
            assert all(p >= 0 for p in pages[:n_valid]), pages
            assert all(p == -1 for p in pages[n_valid:]), pages
            chosen = pages[:n_valid]
            assert len(set(chosen)) == n_valid, "a page selected twice"
            assert set(chosen) <= set(cands), "selected a sink, window or missing page"
            # Returned scores: the reference on candidates, -inf elsewhere.
            got = sel.page_scores[r, kv]
            for j in range(dig.shape[1]):
                if j in ref[kv]:
                    tol = 0.0 if exact else SOFTMAX_ATOL * (1 + abs(ref[kv][j]))
                    assert abs(float(got[j]) - ref[kv][j]) <= tol, (j, float(got[j]), ref[kv][j])
                else:
                    assert math.isinf(float(got[j])) and float(got[j]) < 0
            tol = 0.0 if exact else 2 * SOFTMAX_ATOL
            # Top-k: no unselected candidate beats a selected one; best first.
            rest = [ref[kv][j] for j in cands if j not in chosen]
            if rest and chosen:
                assert min(ref[kv][j] for j in chosen) >= max(rest) - tol
            seq = [ref[kv][j] for j in chosen]
            assert all(a >= b_ - tol for a, b_ in itertools.pairwise(seq))


@FUZZ
@given(geo=geometry(), seed=st.integers(0, 2**31 - 1))
def test_fits_budget_and_candidates_match_page_counting(geo: dict, seed: int) -> None:
    cfg: FreeKVConfig = geo["cfg"]
    seq_lens = torch.tensor(geo["seq_lens"], dtype=torch.int64)
    p_max = int(num_pages(seq_lens, cfg.page_size).max()) + 2
    fits = fits_budget(seq_lens, cfg).tolist()
    mask = candidate_mask(seq_lens, p_max, cfg)
    for r, length in enumerate(geo["seq_lens"]):
        n = math.ceil(length / cfg.page_size)
        assert fits[r] == (n <= cfg.budget_pages)
        cands = _candidates(length, cfg)
        assert [j for j in range(p_max) if mask[r, j]] == cands
        if fits[r]:
            # Dense while it fits: sink + all candidates + window cover every page.
            assert len(cands) <= cfg.num_selected_pages
            covered = set(range(min(cfg.num_sink_pages, n))) | set(cands)
            covered |= set(range(max(0, n - cfg.num_window_pages), n))
            assert covered == set(range(n))


@FUZZ
@given(geo=geometry(), seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["minmax", "mean"]))
def test_digests_bound_every_key_of_full_pages(geo: dict, seed: int, kind: str) -> None:
    cfg: FreeKVConfig = geo["cfg"]
    b, h, hq, d = geo["b"], geo["h"], geo["hq"], geo["d"]
    p = cfg.page_size
    seq_lens = torch.tensor(geo["seq_lens"], dtype=torch.int64)
    length = int(seq_lens.max())
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, length, h, d, generator=g)
    q = torch.randn(b, hq, d, generator=g)
    extra = 2
    dig = build_digests(keys, seq_lens, p, kind, max_pages=-(-length // p) + extra)
    assert dig.shape == (b, -(-length // p) + extra, 2, h, d)
    scores = quest_scores(q, dig)
    group = hq // h
    for r in range(b):
        full = int(seq_lens[r]) // p
        for j in range(dig.shape[1]):
            if j >= full:
                assert torch.count_nonzero(dig[r, j]) == 0, "digest of a page that is not full"
                continue
            page = keys[r, j * p : (j + 1) * p]  # [p, H, D]
            assert torch.equal(dig[r, j], page_digests(page.unsqueeze(0), kind)[0])
            if kind == "mean":
                assert torch.allclose(dig[r, j, 0], page.mean(0), atol=1e-6)
                continue
            lo, hi = dig[r, j, 0], dig[r, j, 1]
            assert bool((lo <= page).all()) and bool((page <= hi).all())
            # Each bound is attained, and the Quest score bounds every key's logit.
            assert torch.equal(lo, page.amin(0)) and torch.equal(hi, page.amax(0))
            for gq in range(hq):
                logits = (page[:, gq // group] * q[r, gq]).sum(-1)
                assert float(logits.max()) <= float(scores[r, gq, j]) + 1e-5


@FUZZ
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    group=st.integers(1, 3),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    tau=st.one_of(st.none(), st.floats(-1.0, 1.0)),
    zero_rows=st.integers(0, 3),
)
def test_correction_flags_follow_the_cosine_rule(
    b: int, h: int, group: int, d: int, seed: int, tau: float | None, zero_rows: int
) -> None:
    hq = h * group
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g)
    q_prev = torch.randn(b, hq, d, generator=g)
    # Some heads identical to the previous query, some queries exactly zero.
    same = torch.rand(b, hq, generator=g) < 0.3
    q = torch.where(same.unsqueeze(-1), q_prev, q)
    for i in range(min(zero_rows, b)):
        q[i, 0] = 0
    flags, c = correction_flags(q, q_prev, h, tau)
    assert flags.shape == (b, h) and flags.dtype == torch.bool and c.dtype == torch.float32
    for r in range(b):
        for kv in range(h):
            cosines = []
            for gq in range(kv * group, (kv + 1) * group):
                x = [float(v) for v in q[r, gq]]
                y = [float(v) for v in q_prev[r, gq]]
                nx = math.sqrt(sum(v * v for v in x))
                ny = math.sqrt(sum(v * v for v in y))
                dot = sum(a * b_ for a, b_ in zip(x, y, strict=True))
                cosines.append(0.0 if nx == 0 or ny == 0 else dot / (nx * ny))
            want = min(1.0, max(-1.0, sum(cosines) / group))
            assert abs(float(c[r, kv]) - want) <= 1e-5
            assert -1.0 <= float(c[r, kv]) <= 1.0
            if tau is None:
                assert not flags[r, kv]
            elif abs(want - tau) > 1e-5:
                assert bool(flags[r, kv]) == (want < tau)
            # The flag is exactly the returned C compared with tau (rounded to float32, the
            # dtype of C).
            if tau is not None:
                assert bool(flags[r, kv]) == (float(c[r, kv]) < _f32(tau))
    if tau is not None and tau <= -1.0:
        assert not flags.any()


@st.composite
def residency(draw: st.DrawFn) -> dict:
    """A consistent residency (slot <-> page maps) and a selection with no duplicates."""
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 2))
    k = draw(st.integers(1, 4))
    s = k + draw(st.integers(0, 2))
    n_p = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s2p = torch.full((b, h, s), -1, dtype=torch.int64)
    p2s = torch.full((b, h, n_p), -1, dtype=torch.int64)
    sel = torch.full((b, h, k), -1, dtype=torch.int64)
    for r in range(b):
        for kv in range(h):
            pages = torch.randperm(n_p, generator=g).tolist()
            slots = torch.randperm(s, generator=g).tolist()
            n_res = draw(st.integers(0, min(s, n_p)))
            for page, slot in zip(pages[:n_res], slots[:n_res], strict=True):
                s2p[r, kv, slot] = page
                p2s[r, kv, page] = slot
            n_sel = draw(st.integers(0, min(k, n_p)))
            chosen = torch.randperm(n_p, generator=g)[:n_sel]
            sel[r, kv, :n_sel] = chosen
    # Integer scores so that victim order has ties (stable by slot index).
    scores = torch.randint(0, 3, (b, h, n_p), generator=g).to(torch.float32)
    return {"s2p": s2p, "p2s": p2s, "sel": sel, "scores": scores}


def _check_maps(s2p: torch.Tensor, p2s: torch.Tensor) -> None:
    b, h, s = s2p.shape
    for r in range(b):
        for kv in range(h):
            held = [int(x) for x in s2p[r, kv] if x >= 0]
            assert len(held) == len(set(held)), "a page resident in two slots"
            for slot in range(s):
                page = int(s2p[r, kv, slot])
                if page >= 0:
                    assert int(p2s[r, kv, page]) == slot
            for page in range(p2s.shape[-1]):
                slot = int(p2s[r, kv, page])
                if slot >= 0:
                    assert int(s2p[r, kv, slot]) == page


@FUZZ
@given(res=residency())
def test_delta_makes_the_selection_resident_with_minimal_recall(res: dict) -> None:
    s2p, p2s, sel, scores = res["s2p"], res["p2s"], res["sel"], res["scores"]
    d = compute_delta(sel, scores, s2p, p2s)
    _check_maps(d.slot_to_page, d.page_to_slot)
    b, h, s = s2p.shape
    for r in range(b):
        for kv in range(h):
            chosen = [int(x) for x in sel[r, kv] if x >= 0]
            before = {int(p): i for i, p in enumerate(s2p[r, kv].tolist()) if p >= 0}
            hits = [p for p in chosen if p in before]
            need = [p for p in chosen if p not in before]
            for p in chosen:
                assert int(d.page_to_slot[r, kv, p]) >= 0, "selected page not resident"
            for p in hits:
                assert int(d.page_to_slot[r, kv, p]) == before[p], "a hit moved"
            recall = {i: int(x) for i, x in enumerate(d.recall[r, kv].tolist()) if x >= 0}
            assert sorted(recall.values()) == sorted(need), "recall is not the missing pages"
            for slot, page in recall.items():
                assert int(d.slot_to_page[r, kv, slot]) == page
            # Slots not recalled keep their page.
            for slot in range(s):
                if slot not in recall:
                    assert int(d.slot_to_page[r, kv, slot]) == int(s2p[r, kv, slot])
            # Victims: empty slots first, then unselected pages by ascending score.
            victims = sorted(recall)
            empties = [i for i in range(s) if int(s2p[r, kv, i]) < 0]
            n_empty_used = min(len(empties), len(need))
            assert set(empties[:n_empty_used]) <= set(victims)
            evicted = [int(s2p[r, kv, i]) for i in victims if int(s2p[r, kv, i]) >= 0]
            assert not set(evicted) & set(chosen), "evicted a selected page"
            kept_unselected = [
                int(s2p[r, kv, i])
                for i in range(s)
                if i not in recall and int(s2p[r, kv, i]) >= 0 and int(s2p[r, kv, i]) not in chosen
            ]
            if evicted and kept_unselected:
                worst_kept = min(float(scores[r, kv, p]) for p in kept_unselected)
                assert max(float(scores[r, kv, p]) for p in evicted) <= worst_kept
            assert int(d.hits[r, kv]) == len(hits)
            assert int(d.recalled[r, kv]) == len(need)
            assert int(d.selected[r, kv]) == len(chosen)


@FUZZ
@given(res=residency(), mask_seed=st.integers(0, 2**31 - 1))
def test_apply_delta_changes_only_masked_heads(res: dict, mask_seed: int) -> None:
    s2p, p2s, sel, scores = res["s2p"], res["p2s"], res["sel"], res["scores"]
    b, h, s = s2p.shape
    n_p = p2s.shape[-1]
    k = sel.shape[-1]
    rows_total = b + 2
    g = torch.Generator().manual_seed(mask_seed)
    rows = torch.randperm(rows_total, generator=g)[:b]
    ls = LayerState(
        digests=torch.zeros(rows_total, n_p, 2, h, 1),
        slot_to_page=torch.full((rows_total, h, s), -1, dtype=torch.int64),
        page_to_slot=torch.full((rows_total, h, n_p), -1, dtype=torch.int64),
        spec_pages=torch.full((rows_total, h, k), -1, dtype=torch.int64),
        spec_len=torch.zeros(rows_total, dtype=torch.int64),
        prev_query=torch.zeros(rows_total, h, 1),
        has_prev=torch.zeros(rows_total, dtype=torch.bool),
        counts=torch.zeros(rows_total, len(COUNTER_NAMES), dtype=torch.int64),
        metrics=torch.zeros(rows_total, 3, dtype=torch.float64),
    )
    ls.slot_to_page[rows] = s2p
    ls.page_to_slot[rows] = p2s
    heads = torch.rand(b, h, generator=g) < 0.6
    counted = torch.rand(b, generator=g) < 0.6
    others = [i for i in range(rows_total) if i not in rows.tolist()]
    recall = apply_delta(ls, rows, sel, scores, heads, counted)
    d = compute_delta(sel, scores, s2p, p2s)
    m3 = heads.unsqueeze(-1)
    assert torch.equal(ls.slot_to_page[rows], torch.where(m3, d.slot_to_page, s2p))
    assert torch.equal(ls.page_to_slot[rows], torch.where(m3, d.page_to_slot, p2s))
    assert torch.equal(recall, torch.where(m3, d.recall, torch.full_like(d.recall, -1)))
    for i in others:
        assert bool((ls.slot_to_page[i] == -1).all()) and bool((ls.page_to_slot[i] == -1).all())
    _check_maps(ls.slot_to_page, ls.page_to_slot)
    w = (heads & counted.unsqueeze(1)).to(torch.int64)
    want = {
        "selections": w.sum(-1),
        "pages_selected": (d.selected * w).sum(-1),
        "pages_recalled": (d.recalled * w).sum(-1),
        "resident_hits": (d.hits * w).sum(-1),
    }
    for i, name in enumerate(COUNTER_NAMES):
        assert torch.equal(ls.counts[rows, i], want.get(name, torch.zeros(b, dtype=torch.int64)))
    assert int(ls.counts[others].abs().sum()) == 0


def test_count_block_adds_consecutive_counters_of_the_given_rows() -> None:
    """``count_block`` is ``count`` of each column: the same totals, other rows untouched."""
    g = torch.Generator().manual_seed(3)
    rows = torch.tensor([4, 1, 2])
    a = torch.zeros(6, len(COUNTER_NAMES), dtype=torch.int64)
    b = torch.zeros_like(a)
    one = LayerState(*(torch.empty(0),) * 7, counts=a, metrics=torch.empty(0))
    other = LayerState(*(torch.empty(0),) * 7, counts=b, metrics=torch.empty(0))
    for first, n in (("steps", 3), ("selections", 4), ("checks", 2)):
        values = torch.randint(0, 9, (3, n), generator=g)
        one.count_block(rows, first, values)
        i = COUNTER_NAMES.index(first)
        for j in range(n):
            other.count(rows, COUNTER_NAMES[i + j], values[:, j])
    assert torch.equal(a, b)
    assert int(a[[0, 3, 5]].abs().sum()) == 0 and int(a.sum()) > 0
    with pytest.raises(ValueError, match="run past the last counter"):
        one.count_block(rows, "pages_recalled", torch.zeros(3, 3, dtype=torch.int64))
