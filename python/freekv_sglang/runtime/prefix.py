"""Shared prefixes: finished requests' host pages reused by later requests.

Driven by the adapter's prefix cache on the scheduler thread:

- :meth:`PrefixStore.publish` (a request finished; from the release hook): its full host pages
  go into the :class:`~freekv_sglang.prefix_tree.HostPrefixTree` under its token ids once the
  row's own conversion jobs are done (their digests stay with the pages, in the per-host-page
  digest store). A request whose offload or recall
  failed publishes nothing;
- :meth:`PrefixStore.offer` (a new request matched cached pages): one pool reference per page
  is taken for the request, and its row adopts the pages at its first forward
  (:meth:`PrefixStore.adopt`, from the facade's ``begin_forward``) instead of offloading them
  again; :meth:`PrefixStore.drop_offer` gives back an offer no row adopted;
- :meth:`PrefixStore.load` copies the pages' K/V to the request's device slots for its prefill
  (the recall op, per layer and chunk of pages, on the current stream).

:class:`PageChecks` is the debug mode of :mod:`freekv_sglang.integrity` (``FREEKV_VERIFY_PAGES``):
what each host page must hold, recorded at offload and checked at load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.host_pool import HostKVPool
from freekv_sglang.integrity import PageChecksumError, page_checksums
from freekv_sglang.prefix_tree import HostPrefixTree
from freekv_sglang.runtime.decode import recall_one_layer
from freekv_sglang.runtime.reclaim import PoolKV
from freekv_sglang.runtime.rows import Row

__all__ = ["LOAD_CHUNK_TOKENS", "PageChecks", "PrefixStore"]

#: Tokens of prefix pages loaded per staging buffer by :meth:`PrefixStore.load` (bounds its
#: transient device memory: this many tokens x KV heads x head dim x K and V).
LOAD_CHUNK_TOKENS = 4096


class PageChecks:
    """Per host page, the checksums ``[layer, K/V]`` of what was offloaded into it (keyed by
    pool index, so a reused page's entry is overwritten by its next offload)."""

    def __init__(self, host: HostKVPool, num_layers: int, page_size: int) -> None:
        self._pool = host.pool
        self._layers = num_layers
        self._p = page_size
        self._sums: dict[int, Tensor] = {}
        self.total = 0  # pages x layers checked
        self.failures_total = 0

    def record(self, layer: int, page_ids: list[int], k: Tensor, v: Tensor) -> None:
        """``page_ids`` of ``layer`` must hold ``k``/``v`` (``[n * page_size, H, D]``)."""
        h, d = k.shape[-2:]
        sums = page_checksums(k.view(-1, self._p, h, d), v.view(-1, self._p, h, d)).cpu()
        for idx, page_sum in zip(self._pool.indices_of(page_ids), sums, strict=True):
            entry = self._sums.get(idx)
            if entry is None:
                entry = self._sums[idx] = torch.zeros(self._layers, 2, dtype=torch.int64)
            entry[layer] = page_sum

    def check(self, layer: int, page_ids: list[int], k: Tensor, v: Tensor) -> None:
        """The loaded pages must equal what was offloaded; :class:`PageChecksumError` if not."""
        h, d = k.shape[-2:]
        sums = page_checksums(k.view(-1, self._p, h, d), v.view(-1, self._p, h, d)).cpu()
        for i, (pid, idx) in enumerate(zip(page_ids, self._pool.indices_of(page_ids), strict=True)):
            self.total += 1
            entry = self._sums.get(idx)
            if entry is None or not torch.equal(entry[layer], sums[i]):
                self.failures_total += 1
                raise PageChecksumError(
                    f"host page {pid} (layer {layer}) does not hold the K/V offloaded into it"
                    + (" (never offloaded)" if entry is None else "")
                )


class PrefixStore:
    """The prefix tree of host pages, the offers made to admitted requests, and their load."""

    def __init__(
        self,
        cfg: FreeKVConfig,
        host: HostKVPool,
        host_kv: Tensor,
        checks: PageChecks | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.host = host
        self._host_kv = host_kv
        self._checks = checks
        self._dtype = dtype
        self._device = device
        self.tree: HostPrefixTree | None = None
        # rid -> pages: one pool reference each, taken for the request.
        self.offers: dict[str, list[int]] = {}
        h, d = host_kv.shape[2], host_kv.shape[5]
        self._num_layers, self._h, self._d = host_kv.shape[1], h, d
        self.adopted_total = 0

    def enable(self) -> HostPrefixTree:
        if self.tree is None:
            self.tree = HostPrefixTree(self.host.pool, self.cfg.page_size)
        return self.tree

    def offer(self, rid: str, page_ids: list[int]) -> None:
        """Request ``rid`` starts with these cached pages (its KV is loaded onto the device for
        the prefill): its row adopts them at its first forward instead of offloading them
        again. Takes one pool reference per page for the request."""
        self.drop_offer(rid)
        self.host.pool.retain(list(page_ids))
        self.offers[rid] = list(page_ids)

    def drop_offer(self, rid: str) -> None:
        """Give back an offer no row adopted (the request left before its prefill)."""
        pages = self.offers.pop(rid, None)
        if pages:
            self.host.pool.release(pages)

    def adopt(self, info: Row) -> None:
        """A new request takes the pages offered to it, if any (their digests are already in
        the store: they belong to the pages)."""
        pages = self.offers.pop(info.rid, None)
        if pages is None:
            return
        info.host_pages = list(pages)
        info.offloaded = len(pages)
        self.adopted_total += len(pages)

    def load(self, page_ids: list[int], slots: Tensor, pool_kv: PoolKV) -> None:
        """Copy the K/V of host pages ``page_ids`` (every layer) to token ``slots`` of the
        engine's pool (``len(page_ids) * page_size`` slots, in page order). The pages must be
        complete (published pages are). Per layer and chunk of pages, the recall op copies the
        pages into a staging buffer (on a GPU the kernel reads the pinned pages directly, HND
        to NHD) and one indexed copy moves the rows to the slots, all on the current stream."""
        p, h, d = self.cfg.page_size, self._h, self._d
        if slots.numel() != len(page_ids) * p:
            raise ValueError(
                f"{len(page_ids)} pages need {len(page_ids) * p} slots, got {slots.numel()}"
            )
        chunk = max(1, LOAD_CHUNK_TOKENS // p)
        for first in range(0, len(page_ids), chunk):
            ids = page_ids[first : first + chunk]
            n = len(ids)
            idx = torch.tensor(self.host.pool.indices_of(ids), dtype=torch.int32)
            work = torch.stack(
                (
                    idx.repeat_interleave(h),
                    torch.zeros(n * h, dtype=torch.int32),
                    torch.arange(h, dtype=torch.int32).repeat(n),
                    (torch.arange(n, dtype=torch.int32) * p).repeat_interleave(h),
                ),
                dim=1,
            ).to(self._device, non_blocking=True)
            stage_k = torch.empty(n * p, h, d, dtype=self._dtype, device=self._device)
            stage_v = torch.empty_like(stage_k)
            dst = slots[first * p : (first + n) * p].to(self._device, torch.int64)
            for layer in range(self._num_layers):
                work[:, 1] = layer  # queued after the previous layer's recall read it
                recall_one_layer(self._host_kv, layer, work, stage_k, stage_v)
                if self._checks is not None:
                    self._checks.check(layer, ids, stage_k, stage_v)
                k_buf, v_buf = pool_kv(layer)
                k_buf[dst] = stage_k.to(k_buf.dtype)
                v_buf[dst] = stage_v.to(v_buf.dtype)

    def publish(
        self,
        row: int,
        info: Row | None,
        token_ids: Any,
        namespace: Any,
        complete_row: Callable[[int], None],
        agree: Callable[[bool], bool] | None = None,
    ) -> int:
        """Cache the full host pages of ``row`` under ``token_ids``; returns the pages newly
        cached. ``complete_row(row)`` waits for the row's conversion jobs (a failed one marks
        the row failed, and then nothing is published). ``agree(ok)``, where given, is true
        only if ``ok`` holds on every tensor-parallel rank (a collective: it is called for
        every row the tree could take, failed or not), so that all ranks' trees stay equal."""
        if self.tree is None or info is None:
            return 0
        if not info.failed:
            complete_row(row)
        ok = not info.failed
        if agree is not None:
            ok = agree(ok)
        if not ok:
            return 0
        n = min(len(token_ids) // self.cfg.page_size, info.offloaded)
        if n == 0:
            return 0
        return self.tree.insert(namespace, token_ids, info.host_pages[:n])
