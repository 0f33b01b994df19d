"""Slot reclaim: device slots of offloaded pages go back to SGLang, with the dense-layer store.

A request over budget needs on the device only its sink pages, its window pages and its budget
region; every other page is in the host pool. :meth:`SlotReclaim.reclaim` (the facade's
``begin_forward``, at a decode step of a sparse request, scheduler thread) frees the device
slots of such pages into SGLang's token allocator and marks them :data:`RECLAIMED_SLOT` in
``req_to_token``. Sparse layers read those pages from the host pool (selection and recall);
dense layers read them from the *dense-layer store*, a device copy of the dense layers' K/V
made on the current stream before the slots are freed (any later write into the slots is
queued after that copy). While the store is full, pages keep their slots.

The allocator is the adapter's (:class:`TokenAllocator` states what this module needs of it);
its capacity is bounded by :meth:`SlotReclaim.host_headroom`, so admission never runs more
tokens than the host pool can hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime.faults import InvariantError
from freekv_sglang.runtime.rows import Row

__all__ = ["RECLAIMED_SLOT", "PoolKV", "SlotReclaim", "TokenAllocator"]

#: ``req_to_token`` entry of a reclaimed position. Slot 0 is SGLang's padding slot: never
#: handed out by the allocator, so it can mark "no device slot" without ambiguity.
RECLAIMED_SLOT = 0

#: ``pool_kv(layer)``: the engine's key and value buffers of a layer (``[slots, H, D]`` each).
PoolKV = Callable[[int], tuple[Tensor, Tensor]]


class TokenAllocator(Protocol):
    """What the runtime needs of the engine's token-slot allocator (the adapter implements it
    by subclassing SGLang's)."""

    size: int

    def free(self, free_index: Tensor) -> None:
        """Return slots; :data:`RECLAIMED_SLOT` entries must be ignored."""

    def device_available_size(self) -> int:
        """Free device slots, without the host pool's bound."""
        ...

    def set_host_headroom(self, headroom: Callable[[int], int]) -> None:
        """Bound the capacity by ``headroom(device_tokens_in_use)``."""


class SlotReclaim:
    """Reclaimed slots of every row, the dense-layer store, and the allocator they go to."""

    def __init__(
        self,
        cfg: FreeKVConfig,
        *,
        store_pages: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        p = cfg.page_size
        self._sink_pages = cfg.sink_tokens // p
        self._dense_idx = {layer: i for i, layer in enumerate(sorted(cfg.dense_layers))}
        self.store_pages = store_pages if self._dense_idx else 0
        shape = (self.store_pages * p, num_kv_heads, head_dim)
        self._store_k = [torch.empty(shape, dtype=dtype, device=device) for _ in self._dense_idx]
        self._store_v = [torch.empty(shape, dtype=dtype, device=device) for _ in self._dense_idx]
        self._store_free = list(reversed(range(self.store_pages)))
        self.allocator: TokenAllocator | None = None
        self._req_to_token: Tensor | None = None
        self._pool_kv: PoolKV | None = None
        self.tokens = 0  # live requests' positions without a device slot
        self.total = 0  # since start
        self.blocked_total = 0  # reclaims skipped for want of dense-store pages
        self._since_admission = False

    def attach(self, allocator: TokenAllocator, req_to_token: Tensor, pool_kv: PoolKV | None):
        self.allocator = allocator
        self._req_to_token = req_to_token
        self._pool_kv = pool_kv

    def tensors(self) -> list[Tensor]:
        return [*self._store_k, *self._store_v]

    def store_kv(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """The dense-layer store's keys and values of ``layer`` (None: not a dense layer)."""
        i = self._dense_idx.get(layer)
        return None if i is None else (self._store_k[i], self._store_v[i])

    @property
    def store_pages_in_use(self) -> int:
        return self.store_pages - len(self._store_free)

    def reclaim(self, row: int, info: Row, length: int, host_idx: Callable[[list[int]], Tensor]):
        """Give back the device slots of ``row``'s pages that left the window for good: pages
        ``[sink pages, window start)`` already in the host pool (the window only moves
        forward). SGLang allocated this step's slots before the forward, so the freed slots go
        to a later step's requests. ``host_idx`` maps host page ids to pool indices."""
        if self.allocator is None or self._req_to_token is None:
            raise InvariantError("slot reclaim before an allocator was attached")
        p = self.cfg.page_size
        window_start = max(-(-length // p) - self.cfg.num_window_pages, 0)
        lo = max(self._sink_pages, info.reclaimed_end)
        hi = min(window_start, info.offloaded)
        if hi <= lo:
            return
        span = self._req_to_token[row, lo * p : hi * p]
        if self._pool_kv is not None and self._dense_idx:
            if len(self._store_free) < hi - lo:
                self.blocked_total += 1  # keep the slots until store pages free up
                return
            self._store_dense(info, span, hi - lo)
        self.allocator.free(span.to(torch.int64))
        span.fill_(RECLAIMED_SLOT)
        if info.reclaimed_end == 0:
            info.reclaimed_end = self._sink_pages
        new_idx = host_idx(info.host_pages[lo:hi])
        info.reclaimed_idx = torch.cat((info.reclaimed_idx, new_idx))
        self.tokens += (hi - info.reclaimed_end) * p
        self.total += (hi - info.reclaimed_end) * p
        self._since_admission = True
        info.reclaimed_end = hi

    def _store_dense(self, info: Row, span: Tensor, n_pages: int) -> None:
        """Copy the dense layers' K/V at ``span`` (slots of ``n_pages`` whole pages) into new
        dense-store pages of ``info``, on the current stream, before the slots are freed."""
        if self._pool_kv is None:
            raise InvariantError("dense-layer store copy without the engine's K/V buffers")
        p = self.cfg.page_size
        pages = [self._store_free.pop() for _ in range(n_pages)]
        dev = self._store_k[0].device
        rows = (torch.tensor(pages, dtype=torch.int64) * p).unsqueeze(1) + torch.arange(p)
        rows = rows.flatten().to(dev, non_blocking=True)
        src = span.to(torch.int64)
        for layer, i in self._dense_idx.items():
            k, v = self._pool_kv(layer)
            self._store_k[i][rows] = k[src]
            self._store_v[i][rows] = v[src]
        info.store_pages.extend(pages)
        info.store_rows = rows if info.store_rows is None else torch.cat((info.store_rows, rows))

    def release(self, info: Row) -> None:
        """``info``'s request left: its store pages free, its reclaimed positions uncounted."""
        self._store_free.extend(info.store_pages)
        if info.reclaimed_end:
            self.tokens -= (info.reclaimed_end - self._sink_pages) * self.cfg.page_size

    def take_event(self) -> bool:
        """True once after slots were reclaimed: SGLang's admission should look again."""
        event, self._since_admission = self._since_admission, False
        return event

    def has_reclaimed(self, info: Row | None) -> bool:
        return info is not None and info.reclaimed_end > self._sink_pages

    def host_headroom(self, device_tokens_in_use: int, free_host_pages: int) -> int:
        """Tokens the host pool can still take: ``free_host_pages`` (free pages plus those live
        requests and parked jobs hold) minus every live token, on a device slot or reclaimed.
        Every token of a live request needs a host page at some point, so no request finds the
        host pool full while this stays non-negative."""
        return free_host_pages * self.cfg.page_size - device_tokens_in_use - self.tokens

    def full_kv(
        self,
        layer: int,
        info: Row,
        row: int,
        length: int,
        kv: tuple[Tensor, Tensor],
        req_to_token: Tensor,
        host_pages: Callable[[Tensor, int], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """All ``length`` keys and values of ``row`` in ``layer`` (``[length, H, D]`` each) in
        position order: device slots where the row has them; for reclaimed pages the dense
        store (a dense layer, with one) or else ``host_pages(pool indices, layer)``."""
        p = self.cfg.page_size
        k_cache, v_cache = kv
        lo, hi = self._sink_pages, info.reclaimed_end
        head = req_to_token[row, : lo * p].to(torch.int64)
        tail = req_to_token[row, hi * p : length].to(torch.int64)
        store = self._dense_idx.get(layer)
        if store is not None and info.store_rows is not None:
            rows = info.store_rows
            k = torch.cat((k_cache[head], self._store_k[store][rows], k_cache[tail]))
            v = torch.cat((v_cache[head], self._store_v[store][rows], v_cache[tail]))
            return k, v
        hk, hv = host_pages(info.reclaimed_idx, layer)
        k = torch.cat((k_cache[head], hk.to(k_cache.device), k_cache[tail]))
        v = torch.cat((v_cache[head], hv.to(v_cache.device), v_cache[tail]))
        return k, v
