"""The host page pool from Python: geometry, ids and refcounts, errors, zero-copy views."""

from __future__ import annotations

import gc
import os
import re

import pytest
import torch

from freekv_sglang import _native as nat

DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn"]


def test_geometry_sizes_and_offsets_follow_the_hnd_layout() -> None:
    g = nat.PageGeometry(32, 8, 32, 128, "bfloat16")
    assert (g.elem_size, g.chunk_bytes, g.layer_bytes) == (2, 16 * 1024, 128 * 1024)
    assert g.page_bytes == 4 * 1024 * 1024
    # offset(layer, head, kv) == ((layer * H + head) * 2 + kv) * page_size * head_dim * elem
    for layer, head, kv in [(0, 0, 0), (0, 0, 1), (3, 5, 1), (31, 7, 1)]:
        assert g.offset(layer, head, kv) == ((layer * 8 + head) * 2 + kv) * 32 * 128 * 2
    assert g == nat.PageGeometry(32, 8, 32, 128, "bfloat16")
    assert g != nat.PageGeometry(32, 8, 16, 128, "bfloat16")
    assert hash(g) == hash(nat.PageGeometry(32, 8, 32, 128, "bfloat16"))
    assert "bfloat16" in repr(g)


@pytest.mark.parametrize(
    "args",
    [(0, 8, 32, 128, "bfloat16"), (1, -1, 32, 128, "bfloat16"), (1, 8, 32, 128, "int8")],
)
def test_bad_geometry_raises_invalid_geometry(args: tuple[int, int, int, int, str]) -> None:
    with pytest.raises(nat.InvalidGeometryError):
        nat.PageGeometry(*args)


def test_offset_out_of_range_raises_layout_mismatch() -> None:
    g = nat.PageGeometry(2, 2, 4, 8, "float16")
    for args in [(2, 0, 0), (0, 2, 0), (0, 0, 2), (-1, 0, 0)]:
        with pytest.raises(nat.LayoutMismatchError):
            g.offset(*args)


def test_exception_hierarchy() -> None:
    kinds = [
        nat.InvalidGeometryError,
        nat.AllocationError,
        nat.PoolExhaustedError,
        nat.StaleHandleError,
        nat.LayoutMismatchError,
        nat.CudaError,
        nat.NumaNodeError,
        nat.NumaBindError,
        nat.WorkerShutdownError,
        nat.JobFailedError,
        nat.InvariantViolationError,
    ]
    assert issubclass(nat.FreeKVError, RuntimeError)
    assert all(issubclass(k, nat.FreeKVError) for k in kinds)
    assert len(set(kinds)) == len(kinds)


def test_alloc_retain_release_and_stale_ids() -> None:
    g = nat.PageGeometry(2, 2, 4, 8, "float16")
    pool = nat.HostPagePool(g, 3 * g.page_bytes + 7, pin=False)
    assert (pool.capacity_pages, pool.used_pages, pool.free_pages) == (3, 0, 3)
    assert not pool.is_pinned
    ids = pool.alloc(2)
    assert len(set(ids)) == 2 and all(i > 0 for i in ids)
    assert sorted(pool.index_of(i) for i in ids) == [0, 1]
    assert pool.indices_of([ids[1], ids[0], ids[1]]) == [
        pool.index_of(i) for i in (ids[1], ids[0], ids[1])
    ]
    assert pool.indices_of([]) == []
    assert (pool.used_pages, pool.free_pages) == (2, 1)
    with pytest.raises(nat.PoolExhaustedError):
        pool.alloc(2)
    assert pool.used_pages == 2  # all or nothing

    pool.retain([ids[0]])  # shared by a second holder (the prefix cache)
    assert pool.refcount(ids[0]) == 2
    assert pool.release(ids) == 1  # ids[1] freed, ids[0] still held
    assert pool.refcount(ids[0]) == 1
    with pytest.raises(nat.StaleHandleError):
        pool.refcount(ids[1])
    with pytest.raises(nat.StaleHandleError):
        pool.index_of(ids[1])
    with pytest.raises(nat.StaleHandleError):
        pool.indices_of([ids[0], ids[1]])  # one stale id fails the batch
    with pytest.raises(nat.StaleHandleError):
        pool.release([ids[1]])
    with pytest.raises(nat.StaleHandleError):
        pool.retain([ids[0], ids[1]])
    assert pool.refcount(ids[0]) == 1  # the failed batch changed nothing
    with pytest.raises(nat.StaleHandleError):
        pool.release([-5])

    reused = pool.alloc(2)
    assert ids[1] not in reused  # same slot comes back with a new generation
    assert {pool.index_of(i) for i in reused} | {pool.index_of(ids[0])} == {0, 1, 2}
    pool.release([ids[0], *reused])
    assert pool.free_pages == 3
    pool.check_invariants()


def test_sizes_that_hold_no_page_raise_allocation_error() -> None:
    g = nat.PageGeometry(2, 2, 4, 8, "float16")
    for size in [0, g.page_bytes - 1, -1]:
        with pytest.raises(nat.AllocationError):
            nat.HostPagePool(g, size)
    with pytest.raises(nat.AllocationError):
        nat.StagingBuffer(0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_views_alias_the_arena(dtype: str) -> None:
    g = nat.PageGeometry(3, 2, 4, 8, dtype)
    pool = nat.HostPagePool(g, 4 * g.page_bytes)
    arena = pool.arena_view()
    assert arena.shape == (4, 3, 2, 2, 4, 8)
    assert arena.dtype == getattr(torch, dtype)
    assert arena.is_contiguous()
    assert arena.untyped_storage().nbytes() == 4 * g.page_bytes
    assert bool((arena.view(torch.uint8) == 0).all())  # fresh anonymous memory

    [pid] = pool.alloc(1)
    page = pool.page_view(pid)
    assert page.shape == (3, 2, 2, 4, 8)
    assert page.data_ptr() == arena.data_ptr() + pool.index_of(pid) * g.page_bytes
    page.view(torch.uint8).fill_(7)
    slot = pool.index_of(pid)
    assert bool((arena[slot].view(torch.uint8) == 7).all())
    others = [s for s in range(4) if s != slot]
    assert bool((arena[others].view(torch.uint8) == 0).all())
    # The byte offset of (layer, head, kv) matches the tensor's indexing.
    flat = page.view(torch.uint8).reshape(-1)
    page[1, 1, 1, 0, :1].view(torch.uint8).fill_(9)
    assert int(flat[g.offset(1, 1, 1)]) == 9
    assert pool.arena_view().data_ptr() == arena.data_ptr()
    with pytest.raises(nat.StaleHandleError):
        pool.page_view(pid + (1 << 32))


def test_views_keep_the_arena_alive() -> None:
    g = nat.PageGeometry(1, 1, 4, 8, "float32")
    pool = nat.HostPagePool(g, 2 * g.page_bytes)
    page = pool.page_view(pool.alloc(1)[0])
    del pool
    gc.collect()
    page.fill_(3.0)  # would fault if the arena had been unmapped
    assert float(page.sum()) == 3.0 * page.numel()


def test_staging_buffer_views() -> None:
    buf = nat.StagingBuffer(1000)
    assert buf.nbytes == 1000 and not buf.is_pinned
    raw = buf.view()
    assert raw.dtype == torch.uint8 and raw.numel() == 1000
    halves = buf.view("float16")
    assert halves.numel() == 500 and halves.data_ptr() == raw.data_ptr()
    halves.fill_(1.0)
    assert bool((raw.view(torch.float16) == 1.0).all())
    with pytest.raises(nat.InvalidGeometryError):
        buf.view("int4")


def test_cuda_runtime_info_agrees_with_pinning() -> None:
    """The line names the loaded runtime (torch's, which importing the package puts in
    ``FREEKV_CUDART``) and its device count, or says why there is none; a pool asked to pin is
    pinned exactly when a device is reported."""
    info = nat.cuda_runtime_info()
    g = nat.PageGeometry(1, 1, 4, 8, "float32")
    pinned = nat.HostPagePool(g, g.page_bytes, pin=True).is_pinned
    found = re.fullmatch(r"(.+) \((\d+) device\(s\)\)", info)
    if found is None:
        assert re.fullmatch(r"no CUDA runtime(: .+)?|.+ \(no usable device: .+\)", info), info
        assert not pinned
    else:
        cudart = os.environ.get("FREEKV_CUDART")
        if cudart and os.path.isfile(cudart):
            assert found[1] == cudart
        assert int(found[2]) == torch.cuda.device_count() > 0
        assert pinned
