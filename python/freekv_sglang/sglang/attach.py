"""The FreeKV runtime of a model runner: sized, built and connected to SGLang's allocator.

:func:`attach_runtime` builds the process's :class:`~freekv_sglang.runtime.FreeKVRuntime` when
the model runner builds its attention backend (both FreeKV backends call it from their
constructor), and connects it to the model runner's
:class:`~freekv_sglang.sglang.memory.FreeKVTokenAllocator` (built by the allocator hook before
the backend exists): the runtime reclaims device slots into it and bounds its capacity by the
host pool. :func:`build_runtime` sizes it (the memory plan, checked against the device and
the host) and refuses, with the flag to change, what it cannot serve.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from freekv_sglang import runtime as rt_mod
from freekv_sglang.kernel_limits import check_kernel_limits
from freekv_sglang.ops import require_kernels
from freekv_sglang.runtime import sizing
from freekv_sglang.runtime.plan import PlanError
from freekv_sglang.runtime.sizing import free_memory_bytes
from freekv_sglang.sglang import ranks
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.sglang.memory import FreeKVTokenAllocator, region_rows, reserved_plan

__all__ = ["attach_runtime", "build_runtime"]

logger = logging.getLogger(__name__)


def build_runtime(model_runner: Any, settings: FreeKVSettings) -> rt_mod.FreeKVRuntime:
    """Size and create the runtime for ``model_runner`` (raises with the flag to change)."""
    if getattr(model_runner, "use_mla_backend", False):
        raise FreeKVStartupError(
            "--kv-offload freekv does not support MLA models (their latent KV cache has no "
            "per-head pages)"
        )
    cfg = settings.retrieval_config()
    pool = model_runner.token_to_kv_pool
    mc = model_runner.model_config
    rank = ranks.rank_info()  # SGLang's tensor-parallel group: this rank holds 1/tp of the heads
    num_q_heads = mc.num_attention_heads // rank.tp_size
    num_kv_heads = pool.head_num
    head_dim = pool.head_dim
    num_layers = pool.layer_num
    bad = [i for i in cfg.dense_layers if i >= num_layers]
    if bad:
        raise FreeKVStartupError(
            f"--freekv-dense-layers names layers {bad}; the model has {num_layers} layers"
        )
    req_to_token = model_runner.req_to_token_pool.req_to_token
    max_requests, max_seq_len = req_to_token.shape
    page_bytes = 2 * num_layers * num_kv_heads * head_dim * pool.dtype.itemsize * cfg.page_size
    device = torch.device(model_runner.device)
    host_bytes = None if settings.host_pool_gb is None else int(settings.host_pool_gb * 2**30)
    reserved = reserved_plan()
    if reserved is not None:
        # Sized while SGLang sized its KV pool, and reserved out of its budget: keep it (at
        # most one budget region per request row).
        host_bytes = reserved.host_pages * page_bytes
        chosen = sizing.plan_memory(
            cfg, num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=pool.dtype, max_seq_len=max_seq_len,
            max_requests=max_requests, device=device, device_tokens=0, free_bytes=None,
            host_pool_bytes=host_bytes, regions=min(reserved.regions, max_requests),
            store_tokens=reserved.store_pages * cfg.page_size,
        )  # fmt: skip
        free_bytes = None  # already checked against SGLang's budget
    else:
        free_bytes = free_memory_bytes(device)
        chosen = sizing.plan_memory(
            cfg, num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=pool.dtype, max_seq_len=max_seq_len,
            max_requests=max_requests, device=device,
            device_tokens=model_runner.max_total_num_tokens, free_bytes=free_bytes,
            host_pool_bytes=host_bytes, regions=settings.sparse_requests,
        )  # fmt: skip
    try:
        chosen.check(free_bytes if device.type == "cuda" else None, sizing.mem_available_bytes())
    except PlanError as e:
        raise FreeKVStartupError(f"--kv-offload freekv: {e}") from None
    if device.type == "cuda":
        check_kernel_limits(
            model=getattr(mc, "model_path", None),
            dtype=pool.dtype,
            head_dim=head_dim,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            num_layers=num_layers,
            page_size=cfg.page_size,
            selected_pages=cfg.num_selected_pages,
            budget=settings.budget,
            host_pages=chosen.host_pages,
            host_pool_gb=settings.host_pool_gb,
        )
    logger.info(
        "freekv: budget %d tokens (%d sink + %d selected pages + %d window, page %d), tau %s, "
        "dense layers %s; memory plan: %s",
        cfg.total_budget_tokens, cfg.sink_tokens, cfg.num_selected_pages, cfg.window_tokens,
        cfg.page_size, cfg.tau, list(cfg.dense_layers), chosen.summary(),
    )  # fmt: skip
    # The budget regions are rows of SGLang's KV buffers past its own slots (pool_around).
    first, rows = region_rows(pool)
    regions = min(chosen.regions, rows // rt_mod.FreeKVRuntime.region_tokens(cfg, 1))
    if regions < 1:
        raise FreeKVStartupError(
            "--kv-offload freekv: SGLang's KV pool has no rows for budget regions (the KV pool "
            "hook did not run: FreeKV serves models whose KV pool is SGLang's MHA pool)"
        )
    layers = range(num_layers)
    kv_buffers = (
        [pool.get_key_buffer(i) for i in layers],
        [pool.get_value_buffer(i) for i in layers],
    )
    runtime = rt_mod.FreeKVRuntime(
        cfg,
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_requests=max_requests,
        max_seq_len=max_seq_len,
        dtype=pool.dtype,
        device=device,
        host_pool_bytes=chosen.host_pages * page_bytes,
        conversion_threads=settings.conversion_threads
        or sizing.default_conversion_threads(
            ranks.ranks_on_host(getattr(model_runner, "server_args", None))
        ),
        kv_buffers=kv_buffers,
        region_first_slot=first,
        max_sparse_requests=regions,
        dense_store_tokens=chosen.store_pages * cfg.page_size,
        rank=rank.tp_rank,
    )
    return runtime


def attach_runtime(model_runner: Any, settings: FreeKVSettings) -> rt_mod.FreeKVRuntime:
    """Build the runtime of ``model_runner``, connect it to the FreeKV token allocator (built by
    the allocator hook before any backend) and make it this process's runtime. Both FreeKV
    attention backends call this from their constructor."""
    device = torch.device(model_runner.device)
    try:
        kernels = require_kernels(device)
    except RuntimeError as e:
        raise FreeKVStartupError(f"--kv-offload freekv: {e}") from None
    logger.info("freekv ops: %s", kernels)
    runtime = build_runtime(model_runner, settings)
    allocator = model_runner.token_to_kv_pool_allocator
    if not isinstance(allocator, FreeKVTokenAllocator):
        runtime.close()
        raise FreeKVStartupError(
            "--kv-offload freekv: the KV allocator hook did not run "
            f"(got {type(allocator).__name__})"
        )
    pool = model_runner.token_to_kv_pool
    runtime.attach_allocator(
        allocator,
        model_runner.req_to_token_pool.req_to_token,
        lambda layer: (pool.get_key_buffer(layer), pool.get_value_buffer(layer)),
    )
    rt_mod.install(runtime)
    return runtime
