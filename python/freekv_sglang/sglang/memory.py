"""SGLang's device token allocator under FreeKV: reclaimed slots and the host pool's bound.

With FreeKV a request over its budget needs on the device only its sink pages, its window
pages and its budget slots; every other page lives in the host pool. The runtime therefore
gives the device slots of such pages back to SGLang's allocator once they are offloaded
(:meth:`~freekv_sglang.runtime.FreeKVRuntime.begin_forward`), and writes
:data:`RECLAIMED_SLOT` into ``req_to_token`` where they were. Two things change in the
allocator, both in :class:`FreeKVTokenAllocator`:

- ``free`` drops :data:`RECLAIMED_SLOT` entries, so when SGLang frees a request's row
  (finish, abort, retraction) it returns only the slots the request still holds;
- ``available_size`` is the smaller of the free device slots and the host pool's headroom
  (its capacity in tokens minus every token of every live request: on the device or
  reclaimed). SGLang's admission, decode-memory check and retraction all read
  ``available_size``, so they see a capacity larger than the device pool (more long requests
  run at once) and never admit more than the host pool can hold (no request fails for want of
  host pages; it waits in SGLang's queue or is retracted instead).

Who calls what: :func:`build_allocator_around` is an AROUND hook on
``KVCacheConfigurator._build_token_to_kv_pool_allocator`` (scheduler process, once, when the
model runner builds its pools, before the attention backend exists); the attention backend
then connects the runtime with :meth:`FreeKVTokenAllocator.set_host_headroom`. Every method
runs on the scheduler thread, which also runs the model, so nothing here needs a lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from freekv_sglang.runtime import RECLAIMED_SLOT
from freekv_sglang.runtime.plan import MemoryPlan, PlanError
from freekv_sglang.runtime.sizing import plan_memory
from freekv_sglang.sglang import ranks
from freekv_sglang.sglang.args import FreeKVStartupError, settings_from_env

__all__ = [
    "RECLAIMED_SLOT",
    "FreeKVTokenAllocator",
    "adopt_allocator",
    "build_allocator_around",
    "pool_around",
    "region_rows",
    "reserve_around",
    "reserved_plan",
    "with_region_rows",
]

logger = logging.getLogger(__name__)

#: FreeKV's memory plan as reserved out of SGLang's KV budget in this process
#: (:func:`reserve_around`); the attention backend builds the runtime with it.
_reserved: MemoryPlan | None = None
#: Request rows to plan budget regions for when ``--max-running-requests`` is not given (the
#: runtime then keeps at most one region per row SGLang actually allocates).
MAX_REQUESTS_HINT = 2048


class FreeKVTokenAllocator(TokenToKVPoolAllocator):
    """SGLang's page-size-1 allocator that knows reclaimed slots and the host pool's bound."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host_headroom: Callable[[int], int] | None = None

    def set_host_headroom(self, headroom: Callable[[int], int]) -> None:
        """``headroom(device_tokens_in_use)``: tokens the host pool can still take."""
        self._host_headroom = headroom

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel():
            free_index = free_index[free_index != RECLAIMED_SLOT]
        super().free(free_index)

    def device_available_size(self) -> int:
        """Free device slots, without the host pool's bound."""
        return int(super().available_size())

    def available_size(self) -> int:
        device = self.device_available_size()
        if self._host_headroom is None:
            return device
        return max(0, min(device, self._host_headroom(self.size - device)))


def adopt_allocator(allocator: Any) -> FreeKVTokenAllocator:
    """The FreeKV allocator in place of SGLang's freshly built ``allocator`` (no slot in use)."""
    if isinstance(allocator, FreeKVTokenAllocator):
        return allocator
    if type(allocator) is not TokenToKVPoolAllocator:
        raise FreeKVStartupError(
            "--kv-offload freekv needs SGLang's token-granular KV allocator (--page-size 1, "
            f"no hybrid or sliding-window pools); this model and these flags build "
            f"{type(allocator).__name__}"
        )
    return FreeKVTokenAllocator(
        allocator.size,
        allocator.dtype,
        allocator.device,
        allocator.get_kvcache(),
        allocator.need_sort,
    )


def build_allocator_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on ``KVCacheConfigurator._build_token_to_kv_pool_allocator``."""
    if kwargs.get("token_to_kv_pool_allocator") is not None:
        # A caller-provided allocator (shared with a draft model): FreeKV refuses speculative
        # decoding at startup, so this is not a configuration it serves.
        raise FreeKVStartupError(
            "--kv-offload freekv cannot share a KV allocator between model runners"
        )
    return adopt_allocator(original(*args, **kwargs))


def pool_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on ``KVCacheConfigurator._build_mha_kv_pool`` (scheduler process, once,
    after :func:`reserve_around` reserved FreeKV's plan): SGLang's KV pool gets, past its own
    slots, the rows of FreeKV's budget regions, so a sparse request's sink, window and budget
    slots are rows of one K and one V buffer per layer and one paged decode attends them all.

    The pool is built for ``max_total_num_tokens`` plus the regions' tokens and then told its
    own size again: SGLang's allocator, bounds checks and copies see the pool they sized (slots
    ``[0, size + page_size)``); the rows from ``size + page_size`` on are FreeKV's
    (:func:`region_rows`). Their bytes were reserved with the plan, so the device holds what it
    held with regions of their own."""
    plan = _reserved
    if plan is None:
        return original(*args, **kwargs)
    cfg = settings_from_env().retrieval_config()
    size = int(kwargs["max_total_num_tokens"])
    extra = plan.regions * cfg.num_selected_pages * cfg.page_size
    pool = with_region_rows(
        lambda slots: original(*args, **{**kwargs, "max_total_num_tokens": slots}), size, extra
    )
    logger.info(
        "freekv: SGLang's KV pool holds %d token slots and, past them, %d rows of %d budget "
        "regions",
        size, extra, plan.regions,
    )  # fmt: skip
    return pool


def with_region_rows(build: Callable[[int], Any], size: int, region_tokens: int) -> Any:
    """The KV pool ``build(slots)`` makes for ``size + region_tokens`` slots, told its own
    ``size`` again: its buffers hold ``region_tokens`` rows past SGLang's slots."""
    pool = build(size + region_tokens)
    pool.size = size
    return pool


def region_rows(pool: Any) -> tuple[int, int]:
    """``(first, count)``: the rows of ``pool``'s K and V buffers past SGLang's own slots, which
    :func:`pool_around` added for FreeKV's budget regions (``count`` 0 when it did not run)."""
    first = int(pool.size) + int(pool.page_size)
    rows = int(pool.get_key_buffer(0).shape[0])
    return first, max(rows - first, 0)


def reserved_plan() -> MemoryPlan | None:
    """The plan :func:`reserve_around` reserved in this process, if it ran."""
    return _reserved


def reserve_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """AROUND hook on ``KVCacheConfigurator._profile_available_bytes`` (scheduler process, once,
    before SGLang sizes its KV pool): FreeKV's device memory comes out of the KV budget that
    ``--mem-fraction-static`` leaves, as HiCache's and HiSparse's do, so the pool SGLang sizes
    from the rest never competes with FreeKV for activations' memory.

    The plan is made with SGLang's budget as the device pool it could hold (an upper bound of
    the pool that gets the rest), and refused, with the flag to change, when it takes it all."""
    global _reserved
    budget = int(original(*args, **kwargs))
    settings = settings_from_env()
    configurator = args[0] if args else kwargs.get("self")
    if not settings.enabled or configurator is None:
        return budget
    mc = configurator.model_config
    server_args = configurator.server_args
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    num_layers = int(mc.num_hidden_layers)
    kv_heads = int(mc.get_num_kv_heads(tp))
    head_dim = int(mc.head_dim)
    dtype = configurator.kv_cache_dtype
    token_bytes = 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    tokens = budget // max(token_bytes, 1)
    if server_args.max_total_tokens:
        tokens = min(tokens, int(server_args.max_total_tokens))
    # Rows are resolved after the pool is sized: plan regions for SGLang's largest default.
    requests = int(server_args.max_running_requests or 0) or MAX_REQUESTS_HINT
    host = None if settings.host_pool_gb is None else int(settings.host_pool_gb * 2**30)
    cfg = settings.retrieval_config()

    def plan_with(host: int | None, regions: int | None, store: int | None) -> MemoryPlan:
        return plan_memory(
            cfg, num_layers=num_layers, num_q_heads=int(mc.num_attention_heads) // tp,
            num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
            max_seq_len=int(mc.context_len), max_requests=requests,
            device=torch.device(configurator.device), device_tokens=tokens, free_bytes=budget,
            host_pool_bytes=host, regions=regions, store_tokens=store,
            ranks_on_host=ranks.ranks_on_host(server_args),
        )  # fmt: skip

    plan = plan_with(host, settings.sparse_requests, None)
    # The defaults depend on this rank's free memory: every rank of a tensor-parallel group
    # takes the smallest (admission reads the host pool's size, so it must be equal).
    host_pages, regions, store_pages = ranks.agree_plan(
        [plan.host_pages, plan.regions, plan.store_pages]
    )
    if (host_pages, regions, store_pages) != (plan.host_pages, plan.regions, plan.store_pages):
        page_bytes = token_bytes * cfg.page_size
        plan = plan_with(host_pages * page_bytes, regions, store_pages * cfg.page_size)
    try:
        plan.check(budget - token_bytes * min(tokens, int(mc.context_len)), None)
    except PlanError as e:
        raise FreeKVStartupError(f"--kv-offload freekv: {e} (of SGLang's KV budget)") from None
    _reserved = plan
    logger.info(
        "freekv: %.3f GiB of SGLang's %.3f GiB KV budget reserved for FreeKV's device state",
        plan.device_bytes / 2**30,
        budget / 2**30,
    )
    return budget - plan.device_bytes
