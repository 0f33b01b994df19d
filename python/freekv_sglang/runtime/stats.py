"""What the runtime reports: its counters and pools (``/server_info``, the decode log line,
Prometheus) and the consistency check the tests and the soak run read.

Called on the scheduler thread by :meth:`~freekv_sglang.runtime.facade.FreeKVRuntime.stats` and
:meth:`~freekv_sglang.runtime.facade.FreeKVRuntime.check_pools`, after the recall stream was
synchronised (the counters of speculative recalls live on the device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from freekv_sglang.host_pool import FreeKVError
from freekv_sglang.runtime.faults import InvariantError

if TYPE_CHECKING:
    from freekv_sglang.runtime.facade import FreeKVRuntime

__all__ = ["check_pools", "device_tensors", "runtime_stats"]


def device_tensors(rt: FreeKVRuntime) -> list[Tensor]:
    """Every device tensor the runtime allocated at construction (what its plan counts)."""
    return [
        *rt.state.tensors(), rt.host_index.table, *rt.regions.tensors(),
        *rt.reclaim.tensors(), *rt.decode.tensors(),
    ]  # fmt: skip


def runtime_stats(rt: FreeKVRuntime) -> dict[str, float]:
    """Counters since start (live and finished requests) and the pools' use."""
    c = rt.state.counters()
    sel = c["pages_selected"]
    pool = rt.host.pool
    tree = rt.prefix.tree
    alloc = rt.reclaim.allocator
    checks = rt.checks
    return {
        "correction_rate": c["correction_rate"],
        "checks": c["checks"],
        "corrections": c["corrections"],
        "pages_recalled": c["pages_recalled"],
        "bytes_recalled": c["bytes_recalled"],
        "resident_hit_rate": c["resident_hits"] / sel if sel else 0.0,
        "host_pages_used": pool.used_pages,
        "host_pages_capacity": pool.capacity_pages,
        "host_pool_usage": pool.used_pages / pool.capacity_pages,
        "rows": rt.live_rows,
        "rows_peak": rt.peak_rows,
        "device_tokens_reclaimed": rt.reclaim.tokens,
        "device_tokens_reclaimed_total": rt.reclaim.total,
        "device_tokens_in_use": (
            alloc.size - alloc.device_available_size() if alloc is not None else -1
        ),
        "budget_regions_in_use": rt.regions.in_use,
        "budget_regions": rt.regions.count,
        "held_dense_steps_total": rt.held_dense_total,
        "dense_store_pages": rt.reclaim.store_pages,
        "dense_store_pages_in_use": rt.reclaim.store_pages_in_use,
        "reclaims_blocked_total": rt.reclaim.blocked_total,
        "offload_jobs_total": rt.offload.jobs_total,
        "offload_waits_total": rt.offload.waits_total,
        "host_pages_parked": rt.offload.parked_pages,
        "prefix_cache_on": tree is not None,
        "prefix_cache_pages": tree.num_pages if tree is not None else 0,
        "prefix_pages_adopted_total": rt.prefix.adopted_total,
        "prefix_hit_tokens_total": rt.prefix.adopted_total * rt.cfg.page_size,
        "prefix_pages_evicted_total": tree.evicted_pages_total if tree is not None else 0,
        "memory_plan_device_bytes": rt.plan.persistent_bytes,
        "memory_device_bytes_allocated": sum(t.nbytes for t in device_tensors(rt)),
        "memory_plan_host_bytes": rt.plan.host_bytes,
        "page_checks_on": checks is not None,
        "page_checks_total": checks.total if checks is not None else 0,
        "page_check_failures_total": checks.failures_total if checks is not None else 0,
    }


def check_pools(rt: FreeKVRuntime, *, live: bool) -> bool:
    """The host pool's own invariants, the reclaimed-slot count never negative, the prefix
    tree's structure, and (``live`` False: no request and no offer left) nothing held but the
    cached prefixes. True, or :class:`~freekv_sglang.runtime.faults.InvariantError` naming
    what is wrong."""
    pool = rt.host.pool
    try:
        pool.check_invariants()
    except FreeKVError as e:
        raise InvariantError(f"host pool inconsistent: {e}") from e
    if rt.reclaim.tokens < 0:
        raise InvariantError(f"reclaimed-slot count is negative ({rt.reclaim.tokens})")
    cached = 0
    tree = rt.prefix.tree
    if tree is not None:
        try:
            tree.check()
        except RuntimeError as e:
            raise InvariantError(f"prefix cache inconsistent: {e}") from e
        cached = tree.num_pages
    if not live and (pool.used_pages != cached or rt.reclaim.tokens != 0):
        raise InvariantError(
            f"idle, yet {pool.used_pages} host pages are in use ({cached} cached) and "
            f"{rt.reclaim.tokens} positions reclaimed"
        )
    return True
