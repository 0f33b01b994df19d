"""The selection's second stage (`freekv_sglang.ops.rerank`) against the study it comes from
(`freekv_sglang.attention.quantize_keys` and `rerank_pages`, measured in ``docs/selection.md``):
the key copy holds exactly the study's quantized keys, and the serving selection with
``rerank=`` selects, page for page, what the study selects on the same keys and query."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from freekv_sglang import attention, kernel_limits, retrieval
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import select as select_mod
from freekv_sglang.ops.rerank import (
    MAX_RERANK_CANDIDATES,
    Rerank,
    dequantize_page_keys,
    quantize_page_keys,
)
from freekv_sglang.ops.select import select_pages, select_pages_reference

B, H, G, D, P_SIZE, PAGES = 2, 2, 2, 32, 8, 20


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_hold_the_study_s_quantized_keys(bits: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(B, PAGES * P_SIZE, H, D, generator=g).to(dtype)
    pages = k.view(B * PAGES, P_SIZE, H, D)
    codes = quantize_page_keys(pages, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (B * PAGES, H, P_SIZE, D * bits // 8)
    lo, hi = pages.amin(1), pages.amax(1)  # the min/max digest: [n, H, D]
    got = dequantize_page_keys(codes, lo, hi, bits)  # [n, H, p, D]
    want = attention.quantize_keys(k, P_SIZE, bits).view(B * PAGES, P_SIZE, H, D)
    assert torch.equal(got, want.permute(0, 2, 1, 3)), (bits, dtype)


def _case(bits: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, PAGES * P_SIZE, H, D, generator=g)
    q = torch.randn(B, H * G, D, generator=g)
    cfg = FreeKVConfig(page_size=P_SIZE, sink_tokens=8, window_tokens=16, budget_tokens=56)
    return {"k": k, "q": q, "cfg": cfg, "bits": bits}


@pytest.mark.parametrize("candidates", [4, 8, 40])
@pytest.mark.parametrize("bits", [2, 4])
def test_serving_rerank_selects_what_the_study_selects(bits: int, candidates: int) -> None:
    c = _case(bits, seed=10 + candidates)
    k, q, cfg = c["k"], c["q"], c["cfg"]
    top_k = cfg.num_selected_pages
    seq_lens = torch.full((B,), PAGES * P_SIZE, dtype=torch.int64)
    sc = D**-0.5
    # The study, on batch tensors: the bound's selection, then its best pages re-ranked by
    # the logits of the quantized keys.
    digests_b = retrieval.build_digests(k, seq_lens, P_SIZE)  # [B, P, 2, H, D]
    sel = retrieval.select_pages(q, digests_b, seq_lens, cfg, scale=sc)
    kq = attention.quantize_keys(k, P_SIZE, bits)
    logits = torch.einsum("bhgd,blhd->bhgl", q.view(B, H, G, D), kq) * 0.5
    study = attention.rerank_pages(sel, logits, seq_lens, cfg, candidates, 0.5, sc)
    # Serving: the digest and code stores per host page (request b's page j is host page
    # b * PAGES + j), empty residency.
    pages = k.view(B * PAGES, P_SIZE, H, D)
    codes = quantize_page_keys(pages, bits)
    digests = digests_b.view(B * PAGES, 2, H, D)
    host_pages = torch.arange(B * PAGES).view(B, PAGES)
    s2p = torch.full((B, H, top_k), -1, dtype=torch.int64)
    p2s = torch.full((B, H, PAGES), -1, dtype=torch.int64)
    out = select_pages_reference(
        q, digests, torch.arange(B), seq_lens, s2p, p2s, host_pages,
        torch.zeros(B, top_k, dtype=torch.int64), page_size=P_SIZE,
        num_sink_pages=cfg.num_sink_pages, num_window_pages=cfg.num_window_pages, top_k=top_k,
        layer=0, scale=sc, rerank=Rerank(codes, bits, candidates),
    )  # fmt: skip
    assert torch.equal(out.selected, study.pages), (out.selected, study.pages)
    finite = torch.isfinite(out.page_scores)
    assert torch.equal(finite, torch.isfinite(study.page_scores))
    torch.testing.assert_close(out.page_scores[finite], study.page_scores[finite])
    # The stage changes the selection (on these keys the bound's choice differs).
    assert not torch.equal(out.selected, sel.pages)


def test_rerank_refuses_codes_that_do_not_fit() -> None:
    c = _case(2, seed=3)
    pages = c["k"].view(B * PAGES, P_SIZE, H, D)
    digests = retrieval.page_digests(pages).view(B * PAGES, 2, H, D)
    codes = quantize_page_keys(pages, 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        Rerank(codes, 3, 4).check(digests, P_SIZE)
    with pytest.raises(ValueError, match=r"rerank codes must have shape \[40, 2, 8, 8\]"):
        Rerank(codes[:, :, :4].contiguous(), 2, 4).check(digests, P_SIZE)
    with pytest.raises(ValueError, match=r"need 1 <= rerank candidates <= 512, got 0"):
        Rerank(codes, 2, 0).check(digests, P_SIZE)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        quantize_page_keys(pages[..., :30], 2)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
def test_the_kernel_runs_the_second_stage_as_the_reference(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The select kernel (its emulated build: CPU tensors with FREEKV_OPS=emulated) re-ranks as
    the reference does on the study's case: the same pages, the same scores within float32
    summation order, the candidates' logits in ``raw``."""
    c = _case(bits, seed=4)
    top_k = c["cfg"].num_selected_pages
    pages = c["k"].view(B * PAGES, P_SIZE, H, D).to(torch.bfloat16)
    digests = retrieval.page_digests(pages).view(B * PAGES, 2, H, D)
    rerank = Rerank(quantize_page_keys(pages, bits), bits, 8)

    def select() -> select_mod.SelectOutputs:
        return select_pages(
            c["q"].to(torch.bfloat16), digests, torch.arange(B), torch.full((B,), 160),
            torch.full((B, H, top_k), -1), torch.full((B, H, PAGES), -1),
            torch.arange(B * PAGES).view(B, PAGES), torch.zeros(B, top_k, dtype=torch.int64),
            page_size=P_SIZE, num_sink_pages=1, num_window_pages=2, top_k=top_k, layer=0,
            rerank=rerank,
        )  # fmt: skip

    monkeypatch.setenv("FREEKV_OPS", "reference")
    want = select()
    monkeypatch.setenv("FREEKV_OPS", "emulated")
    assert select_mod.extension_for(c["q"]) is not None  # the emulated build is what runs
    got = select()
    assert torch.equal(got.selected, want.selected)
    finite = torch.isfinite(want.page_scores)
    assert torch.equal(torch.isfinite(got.page_scores), finite)
    assert int(finite.sum()) == B * H * 8  # every head re-ranked its 8 candidates
    torch.testing.assert_close(got.page_scores, want.page_scores, rtol=1e-5, atol=1e-7)
    cand = finite.repeat_interleave(G, dim=1)
    torch.testing.assert_close(got.raw[cand], want.raw[cand], rtol=1e-5, atol=1e-5)
    for name in ("recall", "counts", "work"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_the_docs_table_states_the_op_s_candidate_bound() -> None:
    assert kernel_limits.RERANK_CANDIDATES.high == MAX_RERANK_CANDIDATES
