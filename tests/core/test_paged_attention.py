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


def _table(lens: list[int], g: torch.Generator, bound: int | None = None) -> object:
    from freekv_sglang.ops.page_table import PageTable

    ptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(torch.tensor(lens), 0)
    ids = torch.randperm(N, generator=g)[: int(ptr[-1])].to(torch.int32)
    return PageTable(ptr, ids, torch.ones(len(lens), dtype=torch.int32), bound)


def test_fixed_form_plans_into_its_own_buffers() -> None:
    """A decode in fixed form (a CUDA graph's) copies each plan's entries into a buffer of
    its share and reads the same tensors from plan to plan; it equals the plain decode of the
    same table bit for bit, whatever the table was built in."""
    from freekv_sglang.paged_attention import FixedTable, ReferenceDecodeKernels

    g = torch.Generator().manual_seed(3)
    k = torch.randn(N, H, D, generator=g)
    v = torch.randn(N, H, D, generator=g)
    q = torch.randn(3, 2 * H, D, generator=g)
    kernels = ReferenceDecodeKernels()
    fixed = kernels.paged(FixedTable(3, 90, "whole"))
    other_size = kernels.paged(FixedTable(2, 90, "whole"))  # another batch size, same share
    seen: list[int] = []
    for lens in ([5, 0, 17], [30, 30, 30], [1, 2, 3]):
        table = _table(lens, g, 30)
        fixed.plan(table, 0.4, 0.0)
        plain = kernels.paged()
        plain.plan(table, 0.4, 0.0)
        assert torch.equal(fixed.run(q, (k, v)), plain.run(q, (k, v))), lens
        ptrs = [t.data_ptr() for t in fixed.buffers()]
        assert seen in ([], ptrs), "a fixed decode's buffers moved between plans"
        seen = ptrs
    other_size.plan(_table([4, 4], g, 30), 0.4, 0.0)
    assert other_size.buffers()[0].data_ptr() == fixed.buffers()[0].data_ptr()


@pytest.mark.parametrize(
    ("rows", "lens", "bound", "entries", "match"),
    [
        (3, [1, 1], 8, 40, "2 rows planned, 3 fixed"),
        (2, [1, 1], None, 40, "no max_kv_len"),
        (2, [30, 20], 30, 40, "50 entries, over its 40"),
        (2, [31, 1], 30, 40, "over the table's bound 30"),
    ],
    ids=["rows", "no bound", "entries", "row bound"],
)
def test_fixed_form_refuses_what_it_cannot_hold(
    rows: int, lens: list[int], bound: int | None, entries: int, match: str
) -> None:
    """`check_fixed_table` is the fixed form's contract, for every kernel set: each refusal
    names its numbers. (FlashInfer's fixed form calls the same check: ``gpu_check``.)"""
    from freekv_sglang.paged_attention import FixedTable, ReferenceDecodeKernels

    g = torch.Generator().manual_seed(4)
    paged = ReferenceDecodeKernels().paged(FixedTable(rows, entries, "t"))
    with pytest.raises(ValueError, match=match):
        paged.plan(_table(lens, g, bound), 1.0, 0.0)


def test_fixed_tables_of_a_share_bound_the_same_entries() -> None:
    from freekv_sglang.paged_attention import FixedTable, ReferenceDecodeKernels

    kernels = ReferenceDecodeKernels()
    g = torch.Generator().manual_seed(5)
    kernels.paged(FixedTable(1, 10, "s")).plan(_table([3], g, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="'s': 20 entries, its buffer has 10"):
        kernels.paged(FixedTable(2, 20, "s")).plan(_table([3, 3], g, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="an entry per row"):
        FixedTable(4, 3, "s")


@pytest.mark.parametrize("group", [1, 4])
def test_merge_of_two_parts_equals_the_whole(group: int) -> None:
    """The dense layers' two-part attention under a graph (pool slots, dense-layer store):
    each part's LSE run, merged, equals one decode over the union (float32, 1e-5); a part
    with no entries leaves the other unchanged."""
    from freekv_sglang.ops.page_table import PageTable
    from freekv_sglang.paged_attention import ReferenceDecodeKernels

    g = torch.Generator().manual_seed(6)
    k = torch.randn(N, H, D, generator=g)
    v = torch.randn(N, H, D, generator=g)
    q = torch.randn(3, H * group, D, generator=g)
    ids = torch.randperm(N, generator=g).to(torch.int32)
    splits = [(10, 25), (0, 40), (7, 0)]  # entries of each row in part a, part b
    parts = []
    offset = 0
    a_ids, b_ids, whole_ids = [], [], []
    for na, nb in splits:
        a_ids.append(ids[offset : offset + na])
        b_ids.append(ids[offset + na : offset + na + nb])
        whole_ids.append(ids[offset : offset + na + nb])
        offset += na + nb
    for chunks in (a_ids, b_ids, whole_ids):
        ptr = torch.zeros(4, dtype=torch.int32)
        ptr[1:] = torch.cumsum(torch.tensor([c.numel() for c in chunks]), 0)
        parts.append(PageTable(ptr, torch.cat(chunks), torch.ones(3, dtype=torch.int32)))
    kernels = ReferenceDecodeKernels()
    runs = []
    for table in parts:
        paged = kernels.paged()
        paged.plan(table, 0.3, 0.0)
        runs.append(paged.run_with_lse(q, (k, v)))
    merged = kernels.merge(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    torch.testing.assert_close(merged, runs[2][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(merged[2], runs[0][0][2])
