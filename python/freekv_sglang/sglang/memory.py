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

from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from freekv_sglang.runtime import RECLAIMED_SLOT
from freekv_sglang.sglang.args import FreeKVStartupError

__all__ = ["RECLAIMED_SLOT", "FreeKVTokenAllocator", "adopt_allocator", "build_allocator_around"]


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
