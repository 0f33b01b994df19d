"""Default sizes of what the runtime allocates, when the user did not set them, and the memory
plan they make (:func:`plan_memory`).

Called at start-up by the adapter, before the runtime exists: once while the engine sizes its
KV pool (FreeKV's plan is reserved out of the KV budget, so the engine's pool gets the rest)
and once when the runtime is built. The host pool follows the device pool's size and the
host's memory; the number of budget regions and the dense-layer store's capacity follow the
device memory they may share.
"""

from __future__ import annotations

import math
import os

import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime.plan import MemoryPlan

__all__ = [
    "DENSE_STORE_SHARE",
    "HOST_TO_DEVICE_RATIO",
    "REGION_SHARE",
    "default_conversion_threads",
    "default_dense_store_tokens",
    "default_host_pool_bytes",
    "default_sparse_requests",
    "free_memory_bytes",
    "plan_memory",
]

#: Default host pool: this many times the device KV pool's tokens (capped by host memory).
HOST_TO_DEVICE_RATIO = 4
#: Share of the device memory left after the engine's pools that budget regions may take by
#: default (the rest stays for activations); on CPU, the share of available host memory.
REGION_SHARE = {"cuda": 0.4, "cpu": 0.125}
#: The same for the dense-layer store (the dense layers' K/V of reclaimed pages).
DENSE_STORE_SHARE = {"cuda": 0.2, "cpu": 0.0625}


def default_host_pool_bytes(
    device_tokens: int,
    max_seq_len: int,
    max_requests: int,
    page_size: int,
    page_bytes: int,
    ranks_on_host: int = 1,
) -> int:
    """Host pool size of one rank when ``--freekv-host-pool-gb`` is not given.

    :data:`HOST_TO_DEVICE_RATIO` times the device pool, so that admission can run that many
    more tokens than the device holds, but at most a quarter of the host's available memory
    divided among the ``ranks_on_host`` scheduler ranks that share the host (several servers
    may share a host too; on a GPU host the pool is pinned, so all of it is resident); never
    less than the device pool plus one full-length request (what the runtime requires).
    Production deployments should size it with ``--freekv-host-pool-gb``.
    """

    def pages(tokens: int) -> int:
        return math.ceil(tokens / page_size) + max_requests

    floor = pages(device_tokens + max_seq_len) * page_bytes
    want = pages(HOST_TO_DEVICE_RATIO * device_tokens) * page_bytes
    avail = mem_available_bytes()
    if avail is not None:
        want = min(want, avail // (4 * max(ranks_on_host, 1)))
    return max(floor, want)


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory still free on ``device`` (available host memory for a CPU); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return mem_available_bytes()


def _share(table: dict[str, float], device: torch.device) -> float:
    return table.get(device.type, table["cpu"])


def default_sparse_requests(
    max_requests: int, region_bytes: int, device: torch.device, free_bytes: int | None
) -> int:
    """Budget regions to allocate when ``--freekv-sparse-requests`` is not given: one per
    request row the engine can run, capped at :data:`REGION_SHARE` of ``free_bytes`` (the
    memory still free, None if unknown), and at least one."""
    if free_bytes is None:
        return max_requests
    cap = int(free_bytes * _share(REGION_SHARE, device)) // max(region_bytes, 1)
    return max(1, min(max_requests, cap))


def default_dense_store_tokens(
    tokens: int, token_bytes: int, device: torch.device, free_bytes: int | None
) -> int:
    """Dense-store capacity: ``tokens`` (all a full host pool can reclaim), capped at
    :data:`DENSE_STORE_SHARE` of ``free_bytes``; ``token_bytes`` is one token's K/V in every
    dense layer. A request whose pages find no room keeps their device slots."""
    if free_bytes is None or token_bytes == 0:
        return tokens
    return min(tokens, int(free_bytes * _share(DENSE_STORE_SHARE, device)) // token_bytes)


def mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_memory(
    cfg: FreeKVConfig,
    *,
    num_layers: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    max_seq_len: int,
    max_requests: int,
    device: torch.device,
    device_tokens: int,
    free_bytes: int | None,
    host_pool_bytes: int | None = None,
    regions: int | None = None,
    store_tokens: int | None = None,
    ranks_on_host: int = 1,
) -> MemoryPlan:
    """FreeKV's memory plan with every size the user did not set chosen by default: the host
    pool from ``device_tokens`` (the engine's KV pool), the dense-layer store and the budget
    regions from ``free_bytes`` (the device memory they may share, None if unknown; budget
    regions at most one per request row; the default host pool shared among ``ranks_on_host``
    ranks)."""
    p = cfg.page_size
    elem = torch.empty((), dtype=dtype).element_size()
    page_bytes = 2 * num_layers * num_kv_heads * head_dim * elem * p
    if host_pool_bytes is None:
        host_pool_bytes = default_host_pool_bytes(
            device_tokens, max_seq_len, max_requests, p, page_bytes, ranks_on_host
        )
    dense = sum(1 for layer in cfg.dense_layers if layer < num_layers)
    store_token_bytes = 2 * dense * num_kv_heads * head_dim * elem
    if store_tokens is None:
        store_tokens = default_dense_store_tokens(
            host_pool_bytes // page_bytes * p, store_token_bytes, device, free_bytes
        )
    store = store_tokens

    def plan(count: int) -> MemoryPlan:
        return MemoryPlan.for_model(
            cfg, num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=dtype, max_seq_len=max_seq_len,
            host_pages=host_pool_bytes // page_bytes, regions=count, store_tokens=store,
        )  # fmt: skip

    if regions is None:
        per_region = plan(1).persistent_bytes - plan(0).persistent_bytes
        regions = default_sparse_requests(max_requests, per_region, device, free_bytes)
    return plan(regions)


def default_conversion_threads(ranks_on_host: int = 1) -> int:
    """Conversion threads of one rank when ``--freekv-conversion-threads`` is not given: the
    cores this process may run on, divided among the ``ranks_on_host`` scheduler ranks when
    each of them sees every core of the host (when the process is already pinned to a subset,
    as SGLang's CPU backend pins each rank to its cores, that subset is its share)."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    host = os.cpu_count() or mine
    if mine < host:
        return max(mine, 1)
    return max(host // max(ranks_on_host, 1), 1)
