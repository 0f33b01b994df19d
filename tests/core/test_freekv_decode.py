"""The reference decode step: exactness while a context fits, correction, ragged batches,
requests joining and leaving."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.attention import (
    attended_token_mask,
    dense_attention,
    freekv_attention,
    prime_after_prefill,
)
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.state import FreeKVState

H, GROUP, D, LMAX = 2, 3, 16, 160


def _cfg(**kw: object) -> FreeKVConfig:
    base: dict[str, object] = {
        "page_size": 4,
        "sink_tokens": 4,
        "window_tokens": 8,
        "selected_pages": 4,
        "dense_layers": (),
        "tau": 0.9,
    }
    base.update(kw)
    return FreeKVConfig(**base)  # type: ignore[arg-type]


def _state(cfg: FreeKVConfig, rows: int = 4, layers: int = 1) -> FreeKVState:
    return FreeKVState(
        cfg,
        num_layers=layers,
        num_q_heads=H * GROUP,
        num_kv_heads=H,
        head_dim=D,
        max_requests=rows,
        max_seq_len=LMAX,
    )


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Random caches of ``n`` requests and a drifting query sequence (adjacent steps similar)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, LMAX, H, D, generator=gen)
    v = torch.randn(n, LMAX, H, D, generator=gen)
    q = torch.randn(n, H * GROUP, D, generator=gen)
    qs = [q]
    for _ in range(80):
        q = 0.85 * q + 0.5 * torch.randn(q.shape, generator=gen)
        qs.append(q)
    return k, v, qs


@pytest.mark.parametrize("selection", ["speculative", "current", "none"])
def test_exactly_dense_while_the_context_fits(selection: str) -> None:
    cfg = _cfg(selection=selection)
    assert cfg.total_budget_tokens == 28
    k, v, qs = _data(2, seed=1)
    st = _state(cfg)
    rows = torch.tensor([1, 3])
    st.add_request(rows)
    lens = torch.tensor([5, 17])
    prime_after_prefill(st, 0, rows, k, lens)
    differed = False
    for t in range(1, 40):
        lens = lens + 1
        out = freekv_attention(qs[t], k, v, lens, st, 0, rows)
        dense = dense_attention(qs[t], k, v, lens)
        fits = lens <= cfg.total_budget_tokens
        for r in range(2):
            if fits[r]:
                assert torch.equal(out[r], dense[r]), (t, r)
            elif not torch.allclose(out[r], dense[r], atol=1e-4):
                differed = True
    assert differed, "over budget the sparse step must differ from dense on random data"


@pytest.mark.parametrize("selection", ["speculative", "current"])
def test_selection_alone_covers_every_page_while_it_fits(selection: str) -> None:
    # Without the dense-while-it-fits override, sink + selected + window is already everything.
    cfg = _cfg(selection=selection)
    k, v, qs = _data(1, seed=2)
    st = _state(cfg)
    rows = torch.tensor([0])
    st.add_request(rows)
    lens = torch.tensor([6])
    prime_after_prefill(st, 0, rows, k, lens)
    for t in range(1, 34):
        lens = lens + 1
        freekv_attention(qs[t], k, v, lens, st, 0, rows)
        pages = st.layers[0].spec_pages[rows] if selection == "speculative" else None
        if pages is not None and int(lens[0]) + 1 <= cfg.total_budget_tokens:
            mask = attended_token_mask(pages, lens + 1, LMAX, cfg, dense_if_fits=False)
            assert mask[0, :, : int(lens[0]) + 1].all()
    if selection == "current":
        ls = st.layers[0]
        s2p = ls.slot_to_page[0]
        # at 34 + 6 = 40 tokens: 10 pages, 1 sink + 2 window, 7 candidates > 4: over budget
        assert (s2p >= 0).sum() == H * cfg.num_selected_pages


def _run_alone(cfg, k, v, qs, start, steps, seed_row=0):
    st = _state(cfg)
    rows = torch.tensor([seed_row])
    st.add_request(rows)
    lens = torch.tensor([start])
    prime_after_prefill(st, 0, rows, k, lens)
    outs = []
    for t in range(1, steps + 1):
        lens = lens + 1
        outs.append(freekv_attention(qs[t], k, v, lens, st, 0, rows, collect_metrics=True))
    return outs, st


def test_ragged_batch_equals_each_request_alone() -> None:
    cfg = _cfg(tau=0.9)
    n = 3
    k, v, qs = _data(n, seed=3)
    starts = torch.tensor([60, 23, 97])
    st = _state(cfg, rows=5)
    rows = torch.tensor([4, 0, 2])
    st.add_request(rows)
    lens = starts.clone()
    prime_after_prefill(st, 0, rows, k, lens)
    batch_outs = []
    for t in range(1, 41):
        lens = lens + 1
        batch_outs.append(freekv_attention(qs[t], k, v, lens, st, 0, rows, collect_metrics=True))
    total = st.counters()
    assert total["corrections"] > 0 and total["checks"] > total["corrections"]
    ls = st.layers[0]
    sums = {key: 0.0 for key in total}
    for i in range(n):
        outs, alone = _run_alone(
            cfg, k[i : i + 1], v[i : i + 1], [q[i : i + 1] for q in qs], int(starts[i]), 40
        )
        for t in range(40):
            torch.testing.assert_close(batch_outs[t][i : i + 1], outs[t], rtol=0, atol=1e-6)
        a = alone.layers[0]
        r = int(rows[i])
        assert torch.equal(ls.slot_to_page[r], a.slot_to_page[0])
        assert torch.equal(ls.page_to_slot[r], a.page_to_slot[0])
        assert torch.equal(ls.spec_pages[r], a.spec_pages[0])
        assert torch.equal(ls.counts[r], a.counts[0])
        assert torch.equal(ls.digests[r], a.digests[0])
        for key, val in alone.counters().items():
            sums[key] += val
    for key in ("checks", "corrections", "pages_selected", "pages_recalled", "resident_hits"):
        assert sums[key] == total[key]


def test_requests_join_and_leave() -> None:
    cfg = _cfg(tau=0.8)
    k, v, qs = _data(3, seed=4)
    st = _state(cfg, rows=3)
    # A runs alone for 10 steps at row 1, B joins at row 0, A leaves after 25 steps and C
    # takes A's row; each must match its own solo run.
    plan = {"A": (0, 50, 1, 0, 25), "B": (1, 30, 0, 10, 45), "C": (2, 70, 1, 25, 45)}
    lens: dict[str, int] = {}
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in plan}
    retired = None
    for step in range(45):
        for name, (i, start, row, first, last) in plan.items():
            if step == first:
                st.add_request([row])
                lens[name] = start
                prime_after_prefill(
                    st,
                    0,
                    torch.tensor([row]),
                    k[i : i + 1],
                    torch.tensor([start]),
                )
            if step == last and name in lens:
                if name == "A":
                    before = st.counters()
                    st.release([row])
                    retired = st.counters()
                    assert retired["pages_recalled"] == before["pages_recalled"]
                del lens[name]
        active = [n for n in plan if n in lens]
        if not active:
            continue
        idx = torch.tensor([plan[n][0] for n in active])
        rows = torch.tensor([plan[n][2] for n in active])
        for n in active:
            lens[n] += 1
        seq = torch.tensor([lens[n] for n in active])
        t_local = [lens[n] - plan[n][1] for n in active]
        q = torch.stack([qs[t][i] for t, i in zip(t_local, idx.tolist(), strict=True)])
        out = freekv_attention(q, k[idx], v[idx], seq, st, 0, rows)
        for j, n in enumerate(active):
            outs[n].append(out[j : j + 1])
    assert retired is not None
    for name, (i, start, _row, first, last) in plan.items():
        solo, _ = _run_alone(
            cfg, k[i : i + 1], v[i : i + 1], [q[i : i + 1] for q in qs], start, last - first
        )
        assert len(outs[name]) == len(solo)
        for got, want in zip(outs[name], solo, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_tau_one_corrects_every_head_and_matches_current_selection() -> None:
    k, v, qs = _data(2, seed=5)
    lens0 = torch.tensor([80, 120])
    res = {}
    for name, cfg in {
        "all": _cfg(tau=1.0),
        "current": _cfg(selection="current"),
        "off": _cfg(tau=None),
    }.items():
        st = _state(cfg)
        rows = torch.tensor([0, 1])
        st.add_request(rows)
        lens = lens0.clone()
        prime_after_prefill(st, 0, rows, k, lens)
        outs = []
        for t in range(1, 21):
            lens = lens + 1
            outs.append(freekv_attention(qs[t], k, v, lens, st, 0, rows))
        res[name] = (outs, st.counters())
    # The first step has no speculative selection to check: it selects with its own query.
    c_all = res["all"][1]
    assert c_all["checks"] == 2 * H * 19 and c_all["corrections"] == c_all["checks"]
    assert res["off"][1]["corrections"] == 0 and res["off"][1]["checks"] == 2 * H * 19
    for a, b in zip(res["all"][0], res["current"][0], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(res["off"][0], res["all"][0], strict=True))


def test_dense_layers_and_metrics() -> None:
    cfg = _cfg(dense_layers=(1,))
    k, v, qs = _data(1, seed=6)
    st = _state(cfg, layers=2)
    rows = torch.tensor([0])
    st.add_request(rows)
    lens = torch.tensor([100])
    for layer in range(2):
        prime_after_prefill(st, layer, rows, k, lens)
    for t in range(1, 6):
        lens = lens + 1
        dense_out = freekv_attention(qs[t], k, v, lens, st, 1, rows, collect_metrics=True)
        assert torch.equal(dense_out, dense_attention(qs[t], k, v, lens))
        freekv_attention(qs[t], k, v, lens, st, 0, rows, collect_metrics=True)
    assert st.counters(layers=[1])["steps"] == 0
    c0 = st.counters(layers=[0])
    assert c0["steps"] == 5
    assert 0.0 < c0["mass_recall"] < 1.0 and c0["rel_err"] > 0.0
    assert c0["bytes_recalled"] == c0["pages_recalled"] * 2 * 4 * D * 4
