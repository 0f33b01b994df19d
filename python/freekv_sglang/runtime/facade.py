"""FreeKV inside one model runner: the facade the engine adapter drives.

One :class:`FreeKVRuntime` exists per scheduler process (built by the adapter's attention
backend; :func:`current` returns it). Every call comes from the scheduler thread that drives
the model, so the bookkeeping needs no lock; the only other threads are the Rust conversion
workers, fenced by their tickets (:mod:`~freekv_sglang.runtime.offload`). Per forward:

1. :meth:`FreeKVRuntime.begin_forward` (once per batch) adopts the batch's requests (a row
   whose rid changed is reset; a new request adopts the prefix pages offered to it), allocates
   host pages for the pages this forward fills and, at a decode step, gives each request over
   budget a budget region (:mod:`~freekv_sglang.runtime.regions`) and reclaims the device slots
   of its offloaded pages (:mod:`~freekv_sglang.runtime.reclaim`);
2. :meth:`FreeKVRuntime.after_kv_write` (per layer, after the engine wrote the layer's K/V)
   writes the digests of the pages that filled (the digest op) and offloads them; under a
   CUDA graph this runs after the step instead (:mod:`~freekv_sglang.runtime.fill`);
3. :meth:`FreeKVRuntime.sparse_decode` (per sparse layer, from the page-table decode of
   :mod:`~freekv_sglang.runtime.paged_decode`): correction, the attention, speculation
   (:mod:`~freekv_sglang.runtime.decode`);
4. :meth:`FreeKVRuntime.release` (finish, abort, retraction) frees what the row held: its host
   pages (parked while jobs still write them), its region, its store pages. It orders the
   current stream after the recall stream (device side) and never waits on the host.

Failures of an offload job or a recall mark the requests they touch (:meth:`failures`); the
adapter aborts them. Shared prefixes are :attr:`FreeKVRuntime.prefix`'s
(:mod:`~freekv_sglang.runtime.prefix`); the adapter's prefix cache calls it directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.host_pool import HostKVPool, PageGeometry
from freekv_sglang.integrity import verify_pages_from_env
from freekv_sglang.ops import PageTable
from freekv_sglang.runtime import stats as stats_mod
from freekv_sglang.runtime.decode import SparseDecode
from freekv_sglang.runtime.faults import FailureLog, FaultPlan, InvariantError
from freekv_sglang.runtime.fill import FilledPages
from freekv_sglang.runtime.offload import OffloadQueue
from freekv_sglang.runtime.plan import MemoryPlan
from freekv_sglang.runtime.prefix import PageChecks, PrefixStore
from freekv_sglang.runtime.reclaim import PoolKV, SlotReclaim, TokenAllocator
from freekv_sglang.runtime.regions import BudgetRegions
from freekv_sglang.runtime.rows import HostIndex, Row
from freekv_sglang.runtime.tables import attended_table
from freekv_sglang.state import FreeKVState

logger = logging.getLogger(__name__)

__all__ = ["FreeKVRuntime", "current", "install"]

_current: FreeKVRuntime | None = None


def current() -> FreeKVRuntime | None:
    """The runtime of this process, or None when FreeKV is off."""
    return _current


def install(runtime: FreeKVRuntime | None) -> None:
    """Make ``runtime`` this process's runtime (closing a previous one)."""
    global _current
    if _current is not None and _current is not runtime:
        _current.close()
    _current = runtime


class FreeKVRuntime:
    """FreeKV state of one model runner (see the module docstring for the call order)."""

    def __init__(
        self,
        cfg: FreeKVConfig,
        *,
        num_layers: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_requests: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        host_pool_bytes: int,
        conversion_threads: int | None,
        kv_buffers: tuple[Sequence[Tensor], Sequence[Tensor]],
        region_first_slot: int,
        max_sparse_requests: int | None = None,
        dense_store_tokens: int | None = None,
        rank: int = 0,
    ) -> None:
        """``kv_buffers``: the engine's K and V buffers of every layer (``[slots, H, D]``),
        the ones its attention reads; the budget regions are their rows from
        ``region_first_slot`` on (``region_tokens`` of them, which the engine's allocator never
        hands out); ``max_sparse_requests``: budget regions (default ``max_requests``);
        ``dense_store_tokens``: capacity of the dense-layer store (default: every token of
        every request row; rounded down to pages); ``rank``: this runtime's tensor-parallel
        rank (it holds that rank's KV heads; faults can be injected per rank)."""
        self.cfg = cfg
        self.rank = rank
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = device
        self.dtype = dtype
        p = cfg.page_size
        dtype_name = str(dtype).removeprefix("torch.")
        self.geometry = PageGeometry(num_layers, num_kv_heads, p, head_dim, dtype_name)
        pages_needed = -(-max_seq_len // p)
        if host_pool_bytes < pages_needed * self.geometry.page_bytes:
            raise ValueError(
                f"the FreeKV host pool ({host_pool_bytes / 2**30:.3f} GiB) cannot hold one "
                f"request of the model's context length ({max_seq_len} tokens need "
                f"{pages_needed * self.geometry.page_bytes / 2**30:.3f} GiB); raise "
                "--freekv-host-pool-gb"
            )
        self.host = HostKVPool(
            self.geometry, host_pool_bytes, pin=torch.cuda.is_available(),
            num_threads=conversion_threads, device=device.index,
        )  # fmt: skip
        self._rows: dict[int, Row] = {}
        self.failed = FailureLog(self._rows)
        self.offload = OffloadQueue(self.host, dtype, device, self.failed.fail)
        regions = max_requests if max_sparse_requests is None else max_sparse_requests
        store_tokens = (
            max_requests * max_seq_len if dense_store_tokens is None else dense_store_tokens
        )
        # Everything below is what the plan counts (test_memory_plan checks the sum).
        self.plan = MemoryPlan.for_model(
            cfg, num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=dtype, max_seq_len=max_seq_len,
            host_pages=self.host.pool.capacity_pages, regions=regions, store_tokens=store_tokens,
        )  # fmt: skip
        # Residency and speculation state: one row per budget region (the digests are per
        # host page, in the decode step's store).
        self.state = FreeKVState(
            cfg, num_layers=num_layers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, max_requests=regions, max_seq_len=max_seq_len,
            device=device, dtype=dtype, with_digests=False,
        )  # fmt: skip
        self.regions = BudgetRegions(
            regions, num_selected_pages=cfg.num_selected_pages, page_size=p,
            k_buffers=kv_buffers[0], v_buffers=kv_buffers[1], first_slot=region_first_slot,
        )  # fmt: skip
        if len(kv_buffers[0]) != num_layers or kv_buffers[0][0].shape[1:] != (
            num_kv_heads,
            head_dim,
        ):
            raise ValueError(
                f"kv_buffers must hold {num_layers} layers of [slots, {num_kv_heads}, "
                f"{head_dim}], got {len(kv_buffers[0])} of {tuple(kv_buffers[0][0].shape)}"
            )
        self.held_dense_total = 0  # decode steps of requests over budget without a region
        self.reclaim = SlotReclaim(
            cfg, store_pages=store_tokens // p, num_kv_heads=num_kv_heads, head_dim=head_dim,
            dtype=dtype, device=device,
        )  # fmt: skip
        self.host_index = HostIndex(self.host, regions, self.state.max_pages, device)
        self._faults = FaultPlan.from_env(rank)
        self.checks = PageChecks(self.host, num_layers, p) if verify_pages_from_env() else None
        self.prefix = PrefixStore(cfg, self.host, self.offload.host_kv, self.checks, dtype, device)
        self.decode = SparseDecode(
            cfg, self.state, self.regions, self.host_index.table, self.offload.host_kv,
            self.host.pool.capacity_pages, self.offload, self._faults, self._rids,
            self.failed.fail, device,
        )  # fmt: skip
        self.filled = FilledPages(self)  # the pages each forward fills: digests, offload
        self._batch_sparse: list[bool] = []
        self.peak_rows = 0

    # --- per forward ----------------------------------------------------------------------

    def begin_forward(
        self, rows: list[int], seq_lens: list[int], rids: list[str] | None, decode: bool = False
    ) -> None:
        """Adopt the batch's requests, allocate host pages for the pages this forward fills
        and, at a decode step, take budget regions and reclaim device slots."""
        p = self.cfg.page_size
        self.filled.start(decode)  # first what the previous step left to offload after it
        self.decode.new_batch(dict(zip(rows, seq_lens, strict=True)))
        if self.offload.parked:
            self.offload.free_parked(block=False)
        for i, (row, length) in enumerate(zip(rows, seq_lens, strict=True)):
            info = self._rows.get(row)
            # Without rids (a replayed CUDA graph's batch) a known row keeps its request.
            rid = rids[i] if rids is not None else (info.rid if info is not None else str(row))
            if info is None or info.rid != rid:
                if info is not None:
                    self.release(row)
                info = self._rows[row] = Row(rid)
                self.prefix.adopt(info)
            full = length // p
            if full > len(info.host_pages):
                have = len(info.host_pages)
                info.host_pages.extend(self.offload.alloc(full - have, self.prefix.tree))
                if info.region >= 0:
                    self.host_index.set(info.region, have, info.host_pages[have:])
            if full > info.offloaded:
                self.filled.spans.append((row, info.offloaded, full))
            if decode and length > self.cfg.total_budget_tokens:
                if not self._take_region(row, info):
                    self.held_dense_total += 1
                elif self.reclaim.allocator is not None:
                    self.reclaim.reclaim(row, info, length, self.host_index.indices)
        self._batch_sparse = [self.is_sparse(r) for r in rows] if decode else []
        self.peak_rows = max(self.peak_rows, len(self._rows))

    def after_kv_write(
        self, layer: int, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor
    ) -> None:
        """Write the digests of the pages that filled in this forward and offload them (after
        the step instead, once :meth:`defer_offload` was called: :mod:`.fill`)."""
        self.filled.after_kv_write(layer, k_cache, v_cache, req_to_token)

    def defer_offload(self, pool_kv: PoolKV, req_to_token: Tensor) -> None:
        """Offload the pages a step fills after the step, in the next forward's host part
        (a step held in a CUDA graph); ``pool_kv(layer)``: the engine's K/V of a layer."""
        self.filled.defer(pool_kv, req_to_token)

    def inject_conversion_fault(self, rows: list[int]) -> None:
        """Fail the next conversion job if the fault plan names one of ``rows``."""
        if self._faults.armed and self._faults.hit("conversion", self._rids(rows)):
            # The hook fails the next job a worker picks up: let the queue drain first, so
            # that it is this one.
            self.offload.wait_all()
            self.host.workers.inject_failure(1)

    def release(self, row: int) -> None:
        """The request in ``row`` left (finish, abort, retraction): free everything it held."""
        info = self._rows.pop(row, None)
        self.failed.forget(row)
        self.filled.drop(row)
        if info is None:
            return
        # A queued recall may still read the row's host pages after they are freed and
        # rewritten; it writes only into this row's region, zeroed after it by a new owner.
        self.decode.order_after_recall()
        if info.host_pages:
            self.offload.free_or_park(row, info.host_pages)
        if info.region >= 0:
            self.host_index.clear(info.region)
            self.state.release(info.region)  # its counters go to the retired totals
            self.regions.give(info.region)
        self.reclaim.release(info)
        self.prefix.drop_offer(info.rid)
        if not self._rows:
            self.offload.free_parked(block=True)  # idle: nothing waits on this
            tree = self.prefix.tree
            logger.info(
                "freekv: idle, host pool %d/%d pages in use (%d cached prefix pages)",
                self.host.pool.used_pages, self.host.pool.capacity_pages,
                tree.num_pages if tree is not None else 0,
            )  # fmt: skip

    # --- decode of requests over budget ---------------------------------------------------

    def is_sparse(self, row: int) -> bool:
        """Whether ``row`` decodes sparsely: over budget and holding a budget region (taken by
        :meth:`begin_forward` at a decode step). Over budget without one it is held dense."""
        info = self._rows.get(row)
        return info is not None and info.region >= 0

    def batch_sparse(self) -> list[bool]:
        """:meth:`is_sparse` of each request of the last decode batch, in its order."""
        return self._batch_sparse

    def ensure_regions(self, rows: list[int]) -> None:
        """Give each of ``rows`` (requests over budget) a budget region if it has none; raises
        when none is free."""
        for r in rows:
            if not self._take_region(r, self._rows[r]):
                raise InvariantError(
                    f"row {r}: no free budget region (all {self.regions.count} in use)"
                )

    def attended_table(
        self, rows: list[int], seq_lens: list[int], req_to_token: Tensor, out: Any = None
    ) -> PageTable:
        """Table of what ``rows`` attend this step (regions required), in ``out`` if given."""
        regions = [self._rows[r].region for r in rows]
        if min(regions, default=0) < 0:
            raise ValueError("attended_table needs ensure_regions for every row first")
        slots = self.regions.slot_indices(regions)
        size = self.regions.size
        return attended_table(self.cfg, rows, seq_lens, req_to_token, slots, size, out)

    @staticmethod
    def region_tokens(cfg: FreeKVConfig, regions: int) -> int:
        """Rows of the engine's KV buffers that ``regions`` budget regions take."""
        return BudgetRegions.tokens(regions, cfg.num_selected_pages, cfg.page_size)

    def slot_buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """The K and V buffers of ``layer`` that hold the budget slots: the engine's,
        ``[slots, H, D]`` each (NHD)."""
        return self.regions.buffers(layer)

    def prepare_sparse(self, rows: list[int], seq_lens: list[int]) -> None:
        """Host part of a decode step of ``rows`` (over budget, lengths including this step's
        token), before any layer: regions, the step buffers, offload waits, faults."""
        self.ensure_regions(rows)
        regions = [self._rows[r].region for r in rows]
        self.decode.prepare(rows, regions, seq_lens)

    def sparse_decode(
        self, layer: int, q: Tensor, scale: float, attend: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """One FreeKV decode step of ``layer`` for the prepared requests (:meth:`prepare_sparse`):
        correction, ``attend(q)`` over the step's attended tables (``[B, H_q, D]`` ->
        ``[B, H_q, D]``), speculation; device work only (:meth:`SparseDecode.step`)."""
        return self.decode.step(layer, q, scale, attend)

    def region_index(self, rows: list[int], device: torch.device) -> Tensor:
        """The budget regions of ``rows`` (taking one where a row has none), on ``device``."""
        self.ensure_regions(rows)
        regions = [self._rows[r].region for r in rows]
        return torch.tensor(regions, dtype=torch.int64).to(device, non_blocking=True)

    def has_reclaimed(self, row: int) -> bool:
        return self.reclaim.has_reclaimed(self._rows.get(row))

    def full_kv(
        self, layer: int, row: int, length: int, k_cache: Tensor, v_cache: Tensor,
        req_to_token: Tensor,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """All ``length`` keys and values of ``row`` in ``layer``, in position order (dense
        layers of a request with reclaimed slots)."""
        info = self._rows[row]
        kv = (k_cache, v_cache)
        return self.reclaim.full_kv(layer, info, row, length, kv, req_to_token, self.offload.read)

    # --- engine memory --------------------------------------------------------------------

    def attach_allocator(
        self, allocator: TokenAllocator, req_to_token: Tensor, pool_kv: PoolKV | None = None
    ) -> None:
        """Reclaim device slots into the engine's ``allocator``, whose capacity the host pool
        bounds (:meth:`host_headroom`); ``pool_kv(layer)``: the engine's K/V of a layer (for
        the dense-layer store; without it dense layers read reclaimed pages from the host)."""
        cap = self.host.pool.capacity_pages * self.cfg.page_size
        if cap < allocator.size:
            raise ValueError(
                f"the FreeKV host pool ({cap} tokens) is smaller than the device KV pool "
                f"({allocator.size} tokens); raise --freekv-host-pool-gb or lower "
                "--max-total-tokens"
            )
        self.reclaim.attach(allocator, req_to_token, pool_kv)
        allocator.set_host_headroom(self.host_headroom)

    def host_headroom(self, device_tokens_in_use: int) -> int:
        """Tokens the host pool can still take, given the device slots in use."""
        pool = self.host.pool
        held = sum(len(info.host_pages) for info in self._rows.values())
        held += self.offload.parked_pages  # free once their jobs finish
        return self.reclaim.host_headroom(
            device_tokens_in_use, pool.capacity_pages - pool.used_pages + held
        )

    # --- shared prefixes ------------------------------------------------------------------

    def publish_prefix(
        self,
        row: int,
        token_ids: Any,
        namespace: Any,
        agree: Callable[[bool], bool] | None = None,
    ) -> int:
        """Cache the full host pages of ``row`` under ``token_ids``; 0 for a failed request
        (failed on any rank, with ``agree``: see :meth:`PrefixStore.publish`)."""
        return self.prefix.publish(
            row, self._rows.get(row), token_ids, namespace, self.offload.complete_row, agree
        )

    # --- failures, statistics, shutdown ---------------------------------------------------

    def failures(self) -> dict[str, str]:
        """Live requests (rid -> message) whose offload or recall failed and that were not
        aborted yet; the scheduler hook aborts each and calls :meth:`clear_failure`."""
        return self.failed.pending()

    def mark_failed(self, rid: str, message: str) -> None:
        """Mark the live request ``rid`` failed for a failure another tensor-parallel rank
        reported (its KV there is incomplete, so it must be aborted and published nowhere)."""
        self.failed.fail([row for row, info in self._rows.items() if info.rid == rid], message)

    def clear_failure(self, rid: str) -> None:
        """The failure of ``rid`` was reported. The row stays marked failed until release:
        :meth:`publish_prefix` refuses it."""
        self.failed.clear(rid)

    def stats(self) -> dict[str, float]:
        """Counters since start (live and finished requests) and the pools' use."""
        self.decode.sync()  # the speculative recalls count too
        return stats_mod.runtime_stats(self)

    def check_pools(self) -> bool:
        """True when what this runtime holds is consistent; raises
        :class:`~freekv_sglang.runtime.faults.InvariantError` otherwise."""
        return stats_mod.check_pools(self, live=bool(self._rows or self.prefix.offers))

    def close(self) -> None:
        self.offload.wait_all()
        self.offload.free_parked(block=True)
        self.host.close()

    # --- helpers --------------------------------------------------------------------------

    @property
    def live_rows(self) -> int:
        return len(self._rows)

    def row(self, row: int) -> Row:
        """The record of the request in ``row`` (KeyError if none)."""
        return self._rows[row]

    def _rids(self, rows: list[int]) -> list[str]:
        return [self._rows[r].rid for r in rows if r in self._rows]

    def _take_region(self, row: int, info: Row) -> bool:
        """Give ``info`` a region (its state reset, its host pages mapped); False if none."""
        if info.region < 0:
            info.region = self.regions.take()
            if info.region >= 0:
                self.state.add_request(info.region)
                self.host_index.set(info.region, 0, info.host_pages)
        return info.region >= 0
