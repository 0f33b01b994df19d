"""FreeKV's memory plan: real model sizes computed without allocating, and a small runtime whose
allocated tensors add up to the plan exactly."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime.plan import MemoryPlan, PlanError
from freekv_sglang.runtime.stats import device_tensors
from tests.runtime.small_runtime import small_runtime

GIB = 2**30
#: Llama-3.1-8B: 32 layers, 32 query and 8 KV heads of 128 dims, bfloat16.
LLAMA_8B = {"num_layers": 32, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}
#: FreeKV's defaults: a 2048-token budget of 512 sink + 32 pages of 32 + 512 window, layer 0 dense.
CFG = FreeKVConfig()
PAGE_BYTES = 2 * 32 * 32 * 8 * 128 * 2  # one host page of Llama-3.1-8B: 4 MiB


def llama_plan(*, context: int, host_gb: float, regions: int, store_tokens: int = 0) -> MemoryPlan:
    return MemoryPlan.for_model(
        CFG,
        **LLAMA_8B,
        dtype=torch.bfloat16,
        max_seq_len=context,
        host_pages=int(host_gb * GIB) // PAGE_BYTES,
        regions=regions,
        store_tokens=store_tokens,
    )


def test_llama_8b_at_128k_with_a_512_gb_host_pool_fits_an_h200() -> None:
    plan = llama_plan(context=131072, host_gb=512, regions=64, store_tokens=1 << 20)
    assert plan.page_bytes == PAGE_BYTES and plan.host_pages == 131072
    assert plan.host_bytes == 512 * GIB
    items = plan.device_items()
    # Digests (lo and hi per page and head) cost 2/p of the keys they describe: 1/p of the host
    # pool's K and V, in the sparse layers (31 of 32).
    assert items["digests"] == plan.host_bytes // 32 * 31 // 32
    assert items["digests"] == pytest.approx(15.5 * GIB)
    assert items["budget_regions"] == 64 * 2 * 32 * 32 * 32 * 8 * 128 * 2  # 8 GiB
    assert plan.device_bytes < 141e9 / 2  # well within the device, SGLang's pool aside
    plan.check(int(141e9), None)
    # The same server with 32 running requests at 32K: smaller residency, same digests.
    small = llama_plan(context=32768, host_gb=512, regions=32, store_tokens=1 << 20)
    assert small.device_items()["digests"] == items["digests"]
    assert small.device_bytes < plan.device_bytes < 141e9


def test_the_plan_grows_with_host_pages_and_regions_never_with_rows() -> None:
    """Nothing of the plan depends on SGLang's request rows (2048 by default on a GPU): its
    inputs are the host pool, the regions and the context; each term is linear in them."""
    base = llama_plan(context=131072, host_gb=256, regions=32)
    more_host = llama_plan(context=131072, host_gb=512, regions=32)
    more_regions = llama_plan(context=131072, host_gb=256, regions=64)
    d_host = more_host.persistent_bytes - base.persistent_bytes
    assert d_host == more_host.device_items()["digests"] - base.device_items()["digests"]
    assert d_host == base.device_items()["digests"]  # twice the pages, twice the digests
    d_regions = more_regions.persistent_bytes - base.persistent_bytes
    per_region = d_regions // 32
    assert d_regions == 32 * per_region
    assert (
        llama_plan(context=131072, host_gb=256, regions=1).persistent_bytes
        - llama_plan(context=131072, host_gb=256, regions=0).persistent_bytes
        == per_region
    )
    # What the old layout cost: digests [rows, pages, 2, H, D] per sparse layer.
    rows_x_context = 2049 * 4096 * 2 * 8 * 128 * 2 * 31
    assert rows_x_context > 900 * GIB > 50 * base.device_bytes


def test_a_plan_that_does_not_fit_names_the_flags() -> None:
    plan = llama_plan(context=131072, host_gb=512, regions=256)
    with pytest.raises(PlanError, match="--freekv-host-pool-gb") as e:
        plan.check(8 * GIB, None)
    assert "--freekv-sparse-requests" in str(e.value) and "--mem-fraction-static" in str(e.value)
    with pytest.raises(PlanError, match="host's available memory"):
        plan.check(None, 64 * GIB)
    plan.check(None, None)  # nothing known: nothing refused


@pytest.mark.parametrize("rerank_bits", [0, 2, 4], ids=["bound", "rerank_2bit", "rerank_4bit"])
@pytest.mark.parametrize("dense_layers", [(), (0,)], ids=["no_dense", "dense_layer_0"])
@pytest.mark.parametrize("regions", [1, 3])
def test_allocated_tensors_add_up_to_the_plan(
    regions: int, dense_layers: tuple[int, ...], rerank_bits: int
) -> None:
    cfg = FreeKVConfig(
        page_size=4, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=dense_layers,
        rerank=2 if rerank_bits else 0, rerank_bits=rerank_bits or 2,
    )  # fmt: skip
    rt = small_runtime(cfg, max_sparse_requests=regions, dense_store_tokens=64)
    allocated = sum(t.nbytes for t in device_tensors(rt))
    assert allocated == rt.plan.persistent_bytes
    items = rt.plan.device_items()
    # b bits for every key element of the sparse layers' host pages (as many elements as the
    # digests' times p / 2: a digest is a page's lo and hi).
    elements = items["digests"] // rt.plan.elem_bytes // 2 * cfg.page_size
    assert items["key_codes"] == elements * rerank_bits // 8
    stats = rt.stats()
    assert stats["memory_device_bytes_allocated"] == stats["memory_plan_device_bytes"]
    assert rt.plan.host_pages == rt.host.pool.capacity_pages
    rt.close()


def test_default_host_pool_and_threads_are_shared_among_the_hosts_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --freekv-host-pool-gb, the ranks of one host share the quarter of its available
    memory one rank would take; conversion threads split the cores the same way unless the
    process is already pinned to its share."""
    from freekv_sglang.runtime import sizing

    mib = 2**20
    monkeypatch.setattr(sizing, "mem_available_bytes", lambda: 384 * mib)
    # 1 KiB pages of 32 tokens: the floor (device pool + one request) is ~32 MiB, the wish
    # (4x the device pool) ~128 MiB, a quarter of the available memory 96 MiB.
    geo = dict(device_tokens=1 << 20, max_seq_len=4096, max_requests=8, page_size=32)
    floor = ((1 << 20) + 4096) // 32 * 1024 + 8 * 1024

    def pool(ranks: int) -> int:
        return sizing.default_host_pool_bytes(**geo, page_bytes=1024, ranks_on_host=ranks)

    assert pool(1) == 96 * mib
    assert pool(2) == 48 * mib  # two ranks on the host: half the share each
    assert pool(8) == floor  # never below what the runtime requires

    monkeypatch.setattr(sizing.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(sizing.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert sizing.default_conversion_threads(1) == 16
    assert sizing.default_conversion_threads(8) == 2
    assert sizing.default_conversion_threads(32) == 1
    monkeypatch.setattr(sizing.os, "sched_getaffinity", lambda pid: {4, 5, 6})
    assert sizing.default_conversion_threads(8) == 3  # already pinned to its share
