"""Device-slot reclaim and the host-bounded allocator, on SGLang's real token allocator.

Two runtimes see the same requests: one attached to a
:class:`~freekv_sglang.sglang.memory.FreeKVTokenAllocator` (it hands the device slots of
offloaded pages outside sink and window back), one not. Their FreeKV outputs must be
bit-identical, the dense-layer K/V gathered from slots + host pool must equal the K/V SGLang
wrote, and after the requests leave the allocator must hold every slot exactly once.
"""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.config import FreeKVConfig

pytest.importorskip("sglang", reason="the allocator subclasses SGLang's")

from freekv_sglang.runtime import FreeKVRuntime, InvariantError
from freekv_sglang.sglang.memory import RECLAIMED_SLOT, FreeKVTokenAllocator, adopt_allocator
from tests.runtime.small_runtime import HQ, LAYERS, D, H, small_runtime, sparse_step

# Tiny shapes (head dim 8, pages of 4) in float32: the ops' references, whatever FREEKV_OPS says.
pytestmark = pytest.mark.ops_reference

P = 4
SLOTS = 600
CFG = FreeKVConfig(page_size=P, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=())


def _runtime(host_bytes: int = 4 << 20) -> FreeKVRuntime:
    return small_runtime(CFG, host_bytes)


def _allocator() -> FreeKVTokenAllocator:
    return FreeKVTokenAllocator(SLOTS, torch.float32, "cpu", None, False)


def test_free_skips_reclaimed_entries_and_bounds_by_host() -> None:
    a = _allocator()
    got = a.alloc(10)
    assert got is not None and RECLAIMED_SLOT not in got.tolist()
    a.free(torch.cat((got[:4], torch.full((3,), RECLAIMED_SLOT, dtype=torch.int64))))
    assert a.available_size() == SLOTS - 6
    assert RECLAIMED_SLOT not in a.free_pages.tolist()
    a.set_host_headroom(lambda in_use: 100 - in_use)
    assert a.available_size() == 100 - 6
    assert a.device_available_size() == SLOTS - 6
    a.set_host_headroom(lambda in_use: -5)
    assert a.available_size() == 0


def test_adopt_refuses_other_allocators() -> None:
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    from freekv_sglang.sglang.args import FreeKVStartupError

    plain = TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", None, False)
    ours = adopt_allocator(plain)
    assert type(ours) is FreeKVTokenAllocator and ours.size == SLOTS
    assert adopt_allocator(ours) is ours

    class Other(TokenToKVPoolAllocator):  # type: ignore[misc]
        pass

    with pytest.raises(FreeKVStartupError, match="--page-size 1"):
        adopt_allocator(Other(SLOTS, torch.float32, "cpu", None, False))


def test_host_pool_must_cover_the_device_pool() -> None:
    rt = _runtime(host_bytes=100 << 10)  # 100 pages of 1 KiB: 400 tokens < SLOTS
    with pytest.raises(ValueError, match="--freekv-host-pool-gb"):
        rt.attach_allocator(_allocator(), torch.zeros(4, 256, dtype=torch.int32))
    rt.close()


def test_reclaim_changes_no_output_and_returns_every_slot() -> None:
    g = torch.Generator().manual_seed(0)
    k_cache = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
    v_cache = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
    alloc = _allocator()
    rt_on, rt_off = _runtime(), _runtime()
    t_on = torch.zeros(4, 256, dtype=torch.int32)
    rt_on.attach_allocator(alloc, t_on)
    rows = torch.tensor([0, 2])
    lens = torch.tensor([61, 90])
    for r, n in zip(rows.tolist(), lens.tolist(), strict=True):
        t_on[r, :n] = alloc.alloc(n).to(torch.int32)
    t_off = t_on.clone()
    used_after_prefill = SLOTS - alloc.available_size()
    assert used_after_prefill == 61 + 90
    for rt, table in ((rt_on, t_on), (rt_off, t_off)):
        rt.begin_forward(rows.tolist(), lens.tolist(), ["a", "b"])
        for layer in range(LAYERS):
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], table)
    q = torch.randn(2, HQ, D, generator=g)
    for _step in range(10):
        lens = lens + 1
        for r, n in zip(rows.tolist(), lens.tolist(), strict=True):
            slot = alloc.alloc(1)
            t_on[r, n - 1] = slot.to(torch.int32)
            t_off[r, n - 1] = slot.to(torch.int32)
        new_k = [torch.randn(2, H, D, generator=g) for _ in range(LAYERS)]
        new_v = [torch.randn(2, H, D, generator=g) for _ in range(LAYERS)]
        outs = []
        for rt, table in ((rt_on, t_on), (rt_off, t_off)):
            rt.begin_forward(rows.tolist(), lens.tolist(), ["a", "b"], decode=True)
            step = []
            for layer in range(LAYERS):
                slots = table[rows, lens - 1].to(torch.int64)
                k_cache[layer][slots] = new_k[layer]
                v_cache[layer][slots] = new_v[layer]
                rt.after_kv_write(layer, k_cache[layer], v_cache[layer], table)
                step.append(
                    sparse_step(
                        rt, layer, q, rows, lens, k_cache[layer], v_cache[layer], table, D**-0.5
                    )
                )
            outs.append(step)
        for a_out, b_out in zip(*outs, strict=True):
            torch.testing.assert_close(a_out, b_out, rtol=0, atol=0)
        q = q + 0.5 * torch.randn(q.shape, generator=g)
    # Every position outside sink and window of an over-budget row lost its device slot.
    for r, n in zip(rows.tolist(), lens.tolist(), strict=True):
        window_start = (-(-n // P) - CFG.num_window_pages) * P
        assert (t_on[r, CFG.sink_tokens : window_start] == RECLAIMED_SLOT).all()
        kept = t_on[r, :n] != RECLAIMED_SLOT
        assert (t_on[r, :n][kept] == t_off[r, :n][kept]).all()
        assert rt_on.has_reclaimed(r)
        # Dense layers read the reclaimed pages from the host pool: same K/V, same order.
        for layer in range(LAYERS):
            k, v = rt_on.full_kv(layer, r, n, k_cache[layer], v_cache[layer], t_on)
            want = t_off[r, :n].to(torch.int64)
            torch.testing.assert_close(k, k_cache[layer][want], rtol=0, atol=0)
            torch.testing.assert_close(v, v_cache[layer][want], rtol=0, atol=0)
    reclaimed = rt_on.stats()["device_tokens_reclaimed"]
    assert reclaimed > 0
    assert reclaimed == sum(
        int((t_on[r, :n] == RECLAIMED_SLOT).sum())
        for r, n in zip(rows.tolist(), lens.tolist(), strict=True)
    )
    in_use = SLOTS - alloc.device_available_size()
    assert in_use == int(lens.sum()) - reclaimed
    assert alloc.available_size() == min(
        SLOTS - in_use, rt_on.host.pool.capacity_pages * P - in_use - reclaimed
    )
    # SGLang frees the whole rows on finish: only the slots still held come back, once each.
    for r, n in zip(rows.tolist(), lens.tolist(), strict=True):
        rt_on.release(r)
        alloc.free(t_on[r, :n].to(torch.int64))
    assert rt_on.reclaim.tokens == 0
    assert alloc.available_size() == SLOTS
    assert sorted(alloc.free_pages.tolist()) == list(range(1, SLOTS + 1))
    assert rt_on.host.pool.used_pages == 0
    rt_on.close()
    rt_off.close()


def test_requests_beyond_the_budget_regions_are_held_dense_until_one_frees() -> None:
    """With one budget region, the second request over budget keeps every device slot and is
    not sparse; once the first leaves, it takes the (zeroed) region and gives slots back."""
    g = torch.Generator().manual_seed(3)
    k_cache = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
    v_cache = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
    alloc = _allocator()
    rt = small_runtime(CFG, 4 << 20, max_sparse_requests=1)
    table = torch.zeros(4, 256, dtype=torch.int32)
    rt.attach_allocator(alloc, table)
    lens = {0: 70, 1: 80}
    for r, n in lens.items():
        table[r, :n] = alloc.alloc(n).to(torch.int32)
    rt.begin_forward(list(lens), list(lens.values()), ["a", "b"])
    for layer in range(LAYERS):
        rt.after_kv_write(layer, k_cache[layer], v_cache[layer], table)
    before = table.clone()
    rt.begin_forward(list(lens), list(lens.values()), ["a", "b"], decode=True)
    assert rt.batch_sparse() == [True, False]
    assert rt.is_sparse(0) and not rt.is_sparse(1)
    assert rt.has_reclaimed(0) and not rt.has_reclaimed(1)
    assert torch.equal(table[1], before[1])  # held dense: every slot kept
    with pytest.raises(InvariantError, match="no free budget region"):
        rt.ensure_regions([1])
    stats = rt.stats()
    assert stats["budget_regions_in_use"] == 1 and stats["budget_regions"] == 1
    assert stats["held_dense_steps_total"] == 1
    # Row 0's decode fills the region; row 0 leaves; row 1 takes the region, zeroed.
    q = torch.randn(1, HQ, D, generator=g)
    for layer in range(LAYERS):
        sparse_step(rt,
            layer, q, torch.tensor([0]), torch.tensor([70]), k_cache[layer], v_cache[layer],
            table, D**-0.5,
        )  # fmt: skip
    first = rt.regions.first  # the regions' rows of the engine buffers
    assert any(bool(rt.slot_buffers(layer)[0][first:].abs().sum() > 0) for layer in range(LAYERS))
    rt.release(0)
    alloc.free(table[0, :70].to(torch.int64))
    rt.begin_forward([1], [81], ["b"], decode=True)
    assert rt.batch_sparse() == [True] and rt.has_reclaimed(1)
    for layer in range(LAYERS):
        assert all(bool((t[first:] == 0).all()) for t in rt.slot_buffers(layer))
    rt.release(1)
    alloc.free(table[1, :81].to(torch.int64))
    assert alloc.available_size() == SLOTS
    assert rt.stats()["budget_regions_in_use"] == 0
    rt.close()


def test_default_budget_regions_follow_free_memory() -> None:
    from freekv_sglang.runtime.sizing import (
        default_dense_store_tokens,
        default_sparse_requests,
    )

    mib = 1 << 20
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_sparse_requests(100, 10 * mib, cuda, 80 * mib) == 3  # 40% of 80
    assert default_sparse_requests(100, 10 * mib, cpu, 800 * mib) == 10  # 1/8 of 800
    assert default_sparse_requests(4, 10 * mib, cpu, 800 * mib) == 4  # request rows
    assert default_sparse_requests(4, 10 * mib, cuda, 1 * mib) == 1  # at least one
    assert default_sparse_requests(4, 10 * mib, cuda, None) == 4  # unknown: one per row
    assert default_dense_store_tokens(10**6, 1024, cuda, 100 * mib) == 20 * 1024  # 20%
    assert default_dense_store_tokens(1000, 1024, cuda, 100 * mib) == 1000  # all reclaimable
