"""The plain-torch reference of FlashInfer's paged decode (`freekv_sglang.paged_attention`)
against SDPA on gathered K/V (float32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.paged_attention import paged_decode_reference

N, H, D = 200, 2, 16


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One request: ``q [H_q, D]`` over ``k``/``v [L, H, D]``."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale, enable_gqa=True
    )
    return out.squeeze(1)


@pytest.mark.parametrize("group", [1, 4])
def test_paged_decode_equals_sdpa_over_the_listed_slots(group: int) -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(N, H, D, generator=g)
    v = torch.randn(N, H, D, generator=g)
    lens = [7, 0, 31, 1]
    idx = [torch.randperm(N, generator=g)[:n] for n in lens]
    indptr = torch.tensor([0, *torch.cumsum(torch.tensor(lens), 0).tolist()], dtype=torch.int32)
    indices = torch.cat(idx).to(torch.int32)
    q = torch.randn(len(lens), H * group, D, generator=g)
    o, lse = paged_decode_reference(q, k, v, indptr, indices, 0.3)
    for b, ids in enumerate(idx):
        if ids.numel() == 0:
            assert torch.equal(o[b], torch.zeros_like(o[b]))
            assert bool(torch.isneginf(lse[b]).all())
            continue
        want = _sdpa(q[b], k[ids], v[ids], 0.3)
        torch.testing.assert_close(o[b], want, rtol=1e-5, atol=1e-5)
        logits = torch.einsum("hgd,lhd->hgl", q[b].view(H, group, D), k[ids]) * 0.3
        torch.testing.assert_close(lse[b], torch.logsumexp(logits, -1).flatten())


def test_bad_tables_are_refused() -> None:
    q = torch.zeros(2, 4, D)
    k = torch.zeros(N, 3, D)
    with pytest.raises(ValueError, match="multiple of 3 KV heads"):
        paged_decode_reference(q, k, k, torch.zeros(3, dtype=torch.int32), torch.zeros(0), 1.0)
    k = torch.zeros(N, 2, D)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        paged_decode_reference(q, k, k, torch.zeros(2, dtype=torch.int32), torch.zeros(0), 1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        paged_decode_reference(q, k, k, torch.tensor([0, 3, 1]), torch.zeros(3), 1.0)


def test_reference_kernel_set_runs_what_it_was_planned_with() -> None:
    """`ReferenceDecodeKernels`: a planned decode runs its table, `single` attends all of its
    K/V, and what they cannot do (run unplanned, soft-cap logits) is refused."""
    from freekv_sglang.ops.page_table import PageTable
    from freekv_sglang.paged_attention import ReferenceDecodeKernels

    g = torch.Generator().manual_seed(2)
    k = torch.randn(N, H, D, generator=g)
    v = torch.randn(N, H, D, generator=g)
    q = torch.randn(2, 2 * H, D, generator=g)
    ids = torch.randperm(N, generator=g)[:50]
    table = PageTable(
        torch.tensor([0, 20, 50], dtype=torch.int32), ids.to(torch.int32), torch.ones(2)
    )
    kernels = ReferenceDecodeKernels()
    paged = kernels.paged()
    with pytest.raises(RuntimeError, match="before plan"):
        paged.run(q, (k, v))
    paged.plan(table, 0.2, 0.0)
    o = paged.run(q, (k, v))
    assert torch.equal(o, paged_decode_reference(q, k, v, table[0], table[1], 0.2)[0])
    torch.testing.assert_close(o[1], _sdpa(q[1], k[ids[20:]], v[ids[20:]], 0.2))
    torch.testing.assert_close(kernels.single(q[0], k[ids[:20]], v[ids[:20]], 0.2, 0.0), o[0])
    with pytest.raises(ValueError, match="soft cap"):
        paged.plan(table, 0.2, 30.0)
    with pytest.raises(ValueError, match="soft cap"):
        kernels.single(q[0], k, v, 0.2, 30.0)
