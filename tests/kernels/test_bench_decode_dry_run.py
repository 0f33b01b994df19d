"""``benchmarks/bench_decode_gpu.py``: its CPU dry run, and the decode loop's FreeKV state after
real steps (the recalled pages are the ones selected, copied from the host pool)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import bench_decode_gpu as bench

# The dry run's tiny shapes (float32) are outside what the kernels take.
pytestmark = pytest.mark.ops_reference


@pytest.mark.slow
def test_dry_run_measures_every_cell(tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    argv = ["--dry-run", "--contexts", "64", "--batches", "1,2", "--steps", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    rows = res["rows"]
    assert {(r["batch"], r["variant"]) for r in rows} == {
        (b, v) for b in (1, 2) for v in ("dense", "dense_mm", "freekv", "sync", "noovl")
    }
    for r in rows:
        assert r["step_ms"] > 0 and "error" not in r, r
    for r in rows:
        if r["variant"] == "freekv":
            assert {"speedup_vs_dense", "speedup_vs_sync", "speedup_vs_noovl"} <= r.keys()
            assert 0.0 <= r["recall_hidden_share"] <= 1.0
            assert r["dense_baseline"] in ("dense", "dense_mm")
        if r["variant"].startswith("dense"):
            assert r["full_kv_allocated"] is True
        else:
            assert 0 <= r["pages_recalled_last_step"] <= 2 * r["pages_selected_per_step"]


def _resident(cell, layer: int) -> list[list[set[int]]]:
    s2p = cell.s2p[layer]
    return [[set(s2p[b, h][s2p[b, h] >= 0].tolist()) for h in range(s2p.shape[1])]
            for b in range(s2p.shape[0])]  # fmt: skip


def _check_budget_slots_hold_host_pages(cell, host: torch.Tensor) -> None:
    p = cell.s.page
    for layer in range(cell.s.layers):
        s2p = cell.s2p[layer]
        for b, h, slot in (s2p >= 0).nonzero().tolist():
            hp = int(cell.host_pages[b, s2p[b, h, slot]])
            tok = int(cell.slot_tokens[b, slot])
            assert torch.equal(cell.kb[layer][tok : tok + p, h], host[hp, layer, h, 0])
            assert torch.equal(cell.vb[layer][tok : tok + p, h], host[hp, layer, h, 1])


@pytest.mark.parametrize("variant", ["freekv", "sync", "noovl"])
def test_steps_make_the_selected_pages_resident(variant: str) -> None:
    s, dev = bench.TINY, bench.Dev(dry=True)
    a = argparse.Namespace(query_rho=0.5, correction_rate=0.5, tau=0.8)
    g = torch.Generator().manual_seed(7)
    host = torch.randn(40, s.layers, s.kv_heads, 2, s.page, s.head_dim, generator=g)
    host = host.to(torch.bfloat16)
    ctx, b = 96, 2
    cell = bench.Cell(s, ctx, b, dev, a)
    cell.build_sparse(host)
    weights = bench.Weights(s, 1, dev.device, torch.bfloat16)
    timers: list = []
    for _ in range(3):
        bench.step(cell, weights, variant, a, timers)
    assert len(timers) == (3 * s.layers if variant == "noovl" else 0)
    assert cell.t_dev.tolist() == [3]  # the device step counter picks each step's noise
    _check_budget_slots_hold_host_pages(cell, host)
    k = s.selected_pages
    for layer in range(s.layers):
        out = cell.now_out[layer] if variant == "sync" else cell.spec_out[layer]
        resident = _resident(cell, layer)
        for bi in range(b):
            for h in range(s.kv_heads):
                want = set(out.selected[bi, h].tolist()) - {-1}
                assert len(want) == k
                assert resident[bi][h] == want  # every slot holds a page of the last selection
        if variant == "sync":
            # Synchronous retrieval selects with the current query at the current length.
            ref = bench.ops.select_pages_reference(
                cell.q16[layer], cell.digests[layer], cell.rows, cell.seq,
                cell.s2p[layer].clone(), cell.p2s[layer].clone(), cell.host_pages,
                cell.slot_tokens, page_size=s.page, num_sink_pages=s.sink // s.page,
                num_window_pages=s.window // s.page, top_k=k, layer=layer,
            )  # fmt: skip
            assert torch.equal(ref.selected, out.selected)
            assert int(ref.counts[..., 1].sum()) == 0  # nothing left to recall


def test_the_two_dense_baselines_compute_the_same_attention() -> None:
    """``dense_mm`` (two batched products, float32 softmax) is the attention SDPA computes:
    within bfloat16 rounding of the output (a stated 2e-2 absolute, values of order 1)."""
    s, dev = bench.TINY, bench.Dev(dry=True)
    a = argparse.Namespace(query_rho=0.5, correction_rate=0.5, tau=0.8)
    cell = bench.Cell(s, 64, 2, dev, a)
    cell.build_dense(1.0)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, s.q_heads, s.head_dim, generator=g).to(torch.bfloat16)
    kv = tuple(torch.randn(2, s.kv_heads, s.head_dim, generator=g).to(torch.bfloat16)
               for _ in range(2))  # fmt: skip
    for layer in range(s.layers):
        want = cell.dense_attention(layer, q, kv).float()
        got = cell.dense_attention(layer, q, kv, mm=True).float()
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=2e-2, rtol=0), (got - want).abs().max()
