"""FreeKV inside one SGLang model runner: host pool, per-request state, offload, recall, attention.

One :class:`FreeKVRuntime` exists per scheduler process (created by the attention backend when
the model runner builds it; :func:`current` returns it). Everything runs on the scheduler
thread that drives the model (SGLang's scheduler and model runner share it, with or without the
overlap scheduler), so the Python bookkeeping needs no lock. The only other threads are the
Rust conversion workers; what they write is fenced by their tickets:

- :meth:`FreeKVRuntime.begin_forward` (once per forward batch, from the backend's
  ``init_forward_metadata``) adopts the batch's requests: a row (``req_pool_idx``) whose owner
  ``rid`` changed is reset, and host pages are allocated for the pages this forward fills;
- :meth:`FreeKVRuntime.after_kv_write` (per layer, right after SGLang wrote the layer's K/V
  into its pool, for prefill, chunked prefill and decode alike) copies every page that is now
  full into the host pool through the conversion workers (NHD -> HND; one job per layer and
  forward, kept in ``_pending[layer]``) and writes the page digests. On CUDA the pages go to
  pinned staging buffers on the offload stream, and the job's worker thread waits for that
  copy's event: the scheduler thread never waits for a device-to-host copy;
- :meth:`FreeKVRuntime.sparse_decode` (per sparse layer and decode step, for requests whose
  context exceeds the budget) runs the FreeKV step: take the speculative selection made at the
  previous step, check the correction rule, re-select and recall flagged heads, attend over
  sink + selected + window, then select with this step's query for the next step and recall
  the delta. A selection is one op, :func:`freekv_sglang.ops.select_pages` (scores, GQA
  reduction, top-k, residency update and recall work list; a CUDA kernel on the device), and
  a recall another, so no step waits for the host. Every recall first waits for the layer's
  offload jobs that write a page below the window (the only pages a selection of this step
  or the next can choose): a host page is never read before its conversion finished, and
  pages still in the window, the newest, leave their jobs running (``offload_waits_total``
  counts the waits that blocked). On CUDA the speculative part runs on the recall stream
  after the layer's attention (``_spec_done[layer]`` is recorded after it; the forward stream
  waits for that event before the layer's next step reads its budget slots);
- :meth:`FreeKVRuntime.release` (finish, abort, retraction: the ``release_kv_cache`` hook)
  orders the current stream after the recall stream (a device-side wait), clears the row's
  state and returns its budget region, so a reused row never inherits residency and a resumed
  request starts afresh. Its host pages are freed at once unless offload jobs still write them;
  then they are parked until those jobs are done (checked at each forward; waited for when
  the pool runs short or no request is left). Release never waits on the host.

Device memory: sink and window tokens are read from SGLang's pool; the selected pages of a
request over budget live in its budget region (``num_selected_pages * page_size`` token slots
per layer and KV head). The regions are allocated once, at construction, for at most
``max_sparse_requests`` requests (so device memory is fixed from start-up and never reallocated
under a running recall); a request takes one at the first decode step over its budget and gives
it back on release. A request over budget that finds no free region is held dense: it keeps
every device slot and attends its whole context (exact, just not sparse) until a region frees.
The selected pages are recalled into the regions from the host pool with the recall op
(`freekv_sglang.ops.recall_direct`; its pure-torch reference on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.host_pool import (
    FreeKVError,
    HostKVPool,
    PageGeometry,
    PoolExhaustedError,
    Ticket,
)
from freekv_sglang.integrity import PageChecksumError, page_checksums, verify_pages_from_env
from freekv_sglang.ops import PageTable, recall_direct
from freekv_sglang.ops import select as select_op
from freekv_sglang.prefix_tree import HostPrefixTree
from freekv_sglang.retrieval import (
    correction_flags,
    fits_budget,
    page_digests,
)
from freekv_sglang.state import FreeKVState, LayerState

logger = logging.getLogger(__name__)

_current: FreeKVRuntime | None = None

#: Tokens of prefix pages loaded per staging buffer by :meth:`FreeKVRuntime.load_prefix`
#: (bounds its transient device memory: 4096 tokens x KV heads x head dim x K and V).
_LOAD_CHUNK_TOKENS = 4096

#: ``req_to_token`` entry of a reclaimed position. Slot 0 is SGLang's padding slot: never
#: handed out by the allocator, so it can mark "no device slot" without ambiguity.
RECLAIMED_SLOT = 0


def current() -> FreeKVRuntime | None:
    """The runtime of this process, or None when FreeKV is off."""
    return _current


@dataclass
class _Row:
    """Host-side bookkeeping of one request row."""

    rid: str
    host_pages: list[int] = field(default_factory=list)  # host page id per logical page
    offloaded: int = 0  # logical pages [0, offloaded) are in the host pool (every layer)
    slot_base: int = -1  # first slot of its budget region, -1 while it has none
    reclaimed_end: int = 0  # pages [sink pages, reclaimed_end) have no device slots
    # Host pool indices of the reclaimed pages, in page order (full_kv without a dense store).
    reclaimed_idx: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    # Dense-store pages holding the reclaimed pages' dense-layer K/V, in page order, and their
    # token rows (on the device; read by full_kv every step).
    store_pages: list[int] = field(default_factory=list)
    store_rows: Tensor | None = None
    # An offload or recall of the request failed: its KV is incomplete, and it stays so marked
    # until the row is released (the abort clears only the pending report), so nothing of it
    # is ever published to the prefix cache.
    failed: bool = False


class _Offload(NamedTuple):
    """One offload job: one layer's pages that became full in one forward."""

    ticket: Ticket
    spans: list[tuple[int, int, int]]  # (row, first page, end page) the job writes
    # CUDA: the event recorded after the device-to-host copy of the job's staging buffers
    # (the job waits for it; kept alive here until the ticket is done). None on CPU.
    event: Any

    def writes_below(self, horizon: dict[int, int]) -> bool:
        """Whether the job writes a page of a row in ``horizon`` below that row's bound."""
        return any(first < horizon.get(row, -1) for row, first, _ in self.spans)

    def writes_row(self, row: int) -> bool:
        return any(r == row for r, _, _ in self.spans)


class AttendedTables(NamedTuple):
    """Token-level page tables (FlashInfer's ``kv_indptr`` / ``kv_indices`` /
    ``kv_last_page_len``, page size 1) of the requests over budget in one decode batch.

    ``fixed`` lists each request's sink and window token slots in SGLang's KV pool; ``selected``
    its budget slots in :meth:`FreeKVRuntime.slot_buffers`. Both hold for every sparse layer of
    the step: token slots and budget regions are per request, not per layer, and a budget slot
    of a request over budget always holds a page selected for its KV head (each head selects
    exactly as many pages as there are slots), so one table serves every head. ``kv_indptr`` and
    ``kv_last_page_len`` are on the CPU (what FlashInfer's planner reads; on the device they
    would cost a sync), ``kv_indices`` on the runtime's device.
    """

    fixed: PageTable
    selected: PageTable


#: ``attend(layer, q, rows, seq_lens, pages)`` of :meth:`FreeKVRuntime.sparse_decode`: attention
#: of ``q [B, H_q, D]`` over the sink, window and budget slots of ``rows`` (``pages [B, H, K]``
#: are the pages the budget slots hold for each KV head); returns ``[B, H_q, D]``.
AttendFn = Callable[[int, Tensor, Tensor, Tensor, Tensor], Tensor]


def token_table(
    rows: list[int], ranges: list[list[tuple[int, int]]], req_to_token: Tensor
) -> PageTable:
    """Token-level page table (page size 1) of request row ``rows[i]``'s positions
    ``[start, end)`` for each ``(start, end)`` of ``ranges[i]``, in order: their slots in
    SGLang's pool, gathered from ``req_to_token`` on its device.

    Only one small array per range crosses to the device, and nothing comes back (the sizes are
    known on the host), so building a table never syncs. ``kv_indptr`` and ``kv_last_page_len``
    stay on the CPU (see :class:`AttendedTables`)."""
    dev = req_to_token.device
    seg_row: list[int] = []
    seg_start: list[int] = []
    seg_len: list[int] = []
    per_req: list[int] = []
    for r, spans in zip(rows, ranges, strict=True):
        n = 0
        for a, b in spans:
            if b < a:
                raise ValueError(f"row {r}: reversed range [{a}, {b})")
            seg_row.append(r)
            seg_start.append(a)
            seg_len.append(b - a)
            n += b - a
        per_req.append(n)
    indptr = torch.zeros(len(rows) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(per_req, dtype=torch.int64), 0)
    total = int(indptr[-1])
    meta = torch.tensor([seg_row, seg_start, seg_len], dtype=torch.int64).reshape(3, -1)
    meta = meta.to(dev, non_blocking=True)
    seg_ptr = torch.cumsum(meta[2], 0) - meta[2]  # first output position of each range
    seg = torch.repeat_interleave(
        torch.arange(meta.shape[1], device=dev), meta[2], output_size=total
    )
    pos = meta[1][seg] + torch.arange(total, device=dev) - seg_ptr[seg]
    indices = req_to_token[meta[0][seg], pos].to(torch.int32)
    return PageTable(indptr, indices, torch.ones(len(rows), dtype=torch.int32))


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
        max_sparse_requests: int | None = None,
        dense_store_tokens: int | None = None,
    ) -> None:
        """``max_sparse_requests``: budget regions to allocate (default ``max_requests``);
        ``dense_store_tokens``: capacity of the dense-layer store (default: every token of
        every request row; rounded down to pages)."""
        self.cfg = cfg
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = device
        self.dtype = dtype
        p = cfg.page_size
        self.geometry = PageGeometry(num_layers, num_kv_heads, p, head_dim, _dtype_name(dtype))
        pages_needed = -(-max_seq_len // p)
        if host_pool_bytes < pages_needed * self.geometry.page_bytes:
            raise ValueError(
                f"the FreeKV host pool ({host_pool_bytes / 2**30:.3f} GiB) cannot hold one "
                f"request of the model's context length ({max_seq_len} tokens need "
                f"{pages_needed * self.geometry.page_bytes / 2**30:.3f} GiB); raise "
                "--freekv-host-pool-gb"
            )
        self.host = HostKVPool(
            self.geometry,
            host_pool_bytes,
            pin=torch.cuda.is_available(),
            num_threads=conversion_threads,
        )
        cap = self.host.pool.capacity_pages
        self._host_kv = (
            self.host.pool.arena_view()
            .view(dtype)
            .view(cap, num_layers, num_kv_heads, 2, p, head_dim)
        )
        self.state = FreeKVState(
            cfg,
            num_layers=num_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_requests=max_requests,
            max_seq_len=max_seq_len,
            device=device,
            dtype=dtype,
        )
        # Budget regions: ``k * p`` token slots each, one per request over budget, all
        # allocated now (uninitialised; a region is zeroed when a request takes it).
        regions = max_requests if max_sparse_requests is None else max_sparse_requests
        if regions < 1:
            raise ValueError(f"max_sparse_requests must be at least 1, got {regions}")
        self.max_sparse_requests = regions
        self._region = cfg.num_selected_pages * p
        self._free_regions = [i * self._region for i in reversed(range(regions))]
        self._k_slots = [self._empty_slots(regions * self._region) for _ in range(num_layers)]
        self._v_slots = [self._empty_slots(regions * self._region) for _ in range(num_layers)]
        self.held_dense_total = 0  # decode steps of requests over budget without a region
        # Dense-layer store: the dense layers' K/V of reclaimed pages, on the device (filled
        # from SGLang's pool when the slots are reclaimed, so dense layers never read the host).
        store_tokens = (
            max_requests * max_seq_len if dense_store_tokens is None else dense_store_tokens
        )
        store_pages = store_tokens // p if cfg.dense_layers else 0
        self._dense_idx = {layer: i for i, layer in enumerate(sorted(cfg.dense_layers))}
        self._store_k = [self._empty_slots(store_pages * p) for _ in self._dense_idx]
        self._store_v = [self._empty_slots(store_pages * p) for _ in self._dense_idx]
        self.dense_store_pages = store_pages
        self._store_free = list(reversed(range(store_pages)))
        self._pool_kv: Callable[[int], tuple[Tensor, Tensor]] | None = None
        self.reclaim_blocked_total = 0  # reclaims skipped for want of dense-store pages
        self._rows: dict[int, _Row] = {}
        # Device-side maps the select op writes the recall work list from: the host pool
        # index of each (row, logical page) (-1: none) and the first token slot of each of a
        # row's budget slots (-1: no region).
        self._host_index = torch.full(
            (max_requests, self.state.max_pages), -1, dtype=torch.int64,
            device=device,
        )  # fmt: skip
        self._slot_tokens = torch.full(
            (max_requests, cfg.num_selected_pages), -1, dtype=torch.int64, device=device
        )
        # The recall stream (CUDA only): the speculative selection and recall for step t+1 run
        # on it after layer l's attention at step t; ``_spec_done[l]`` is recorded after them
        # and the forward stream waits for it before layer l reads its budget slots at step t+1.
        self._recall_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._spec_done: list[Any] = [None] * num_layers
        # The offload stream (CUDA only): copies each layer's newly full pages from the fresh
        # gather into pinned staging buffers after the forward stream's K/V write; the
        # conversion job waits for the copy's event on its worker thread, so the scheduler
        # thread never waits for a device-to-host copy.
        self._offload_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Offload jobs per layer, oldest first; a job leaves the list once it was waited for.
        self._pending: list[list[_Offload]] = [[] for _ in range(num_layers)]
        self.offload_jobs_total = 0
        self.offload_waits_total = 0  # waits of the scheduler thread on an unfinished job
        # Host pages of released requests that offload jobs still write: freed once their
        # jobs are done (:meth:`_free_released`), so a reused page never takes a stale write.
        self._released: list[tuple[list[int], list[_Offload]]] = []
        # Requests whose offload or recall failed: row -> (rid, message); the scheduler hook
        # aborts them (take_failures) before their step's result is used.
        self._failed: dict[int, tuple[str, str]] = {}
        self._faults = FaultPlan.from_env()
        # Debug mode (FREEKV_VERIFY_PAGES=1, see freekv_sglang.integrity): per host page id,
        # the checksums [layer, K/V] of what was offloaded into it, checked at prefix load-back.
        self._verify_pages = verify_pages_from_env()
        self._page_sums: dict[int, Tensor] = {}
        self.page_checks_total = 0  # pages x layers checked at load-back
        self.page_check_failures_total = 0
        # Per-forward batch view (set by begin_forward).
        self._batch_rows: list[int] = []
        self._batch_lens: list[int] = []
        self._batch_len: dict[int, int] = {}  # row -> length, of the same batch
        self._horizon: dict[int, int] = {}  # row -> recall horizon, of the same batch
        self._batch_sparse: list[bool] = []
        self._batch_split: tuple[Tensor, Tensor] | None = None
        self._new_pages: list[tuple[int, int, int]] = []  # (row, first page, end page)
        self.decode_steps = 0
        # Device slots reclaimed from offloaded pages (see reclaim in begin_forward).
        self._allocator: Any = None
        self._req_to_token: Tensor | None = None
        self._sink_pages = cfg.sink_tokens // p
        self.reclaimed_tokens = 0  # live requests' positions without a device slot
        self.reclaimed_total = 0  # since start
        self.peak_rows = 0
        self._reclaimed_since_admission = False
        # Shared prefixes (None unless the prefix cache is on): finished requests' host pages,
        # and the pages offered to admitted requests that matched them (rid -> pages, digests;
        # one pool reference each, taken for the request) until their row adopts them.
        self.prefix_tree: HostPrefixTree | None = None
        self._offers: dict[str, tuple[list[int], list[Tensor | None]]] = {}
        self.prefix_pages_adopted_total = 0

    # --- helpers ------------------------------------------------------------------------------

    def _sync_recall_stream(self) -> None:
        """Host-side wait for the recall stream: before host pages it may still read are freed
        (a conversion thread may rewrite them at once), and before counters are read."""
        if self._recall_stream is not None:
            self._recall_stream.synchronize()

    def _empty_slots(self, n: int) -> Tensor:
        return torch.empty(
            n, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=self.device
        )

    def _take_region(self, row: int, info: _Row) -> bool:
        """Give ``row`` a free budget region (zeroed in every layer); False when none is free.
        A region is free once its last owner was released; release ordered the current stream
        after the recall stream, so the zeroing here runs after every recall into it."""
        if info.slot_base >= 0:
            return True
        if not self._free_regions:
            return False
        base = self._free_regions.pop()
        for t in (*self._k_slots, *self._v_slots):
            t[base : base + self._region].zero_()
        info.slot_base = base
        first = torch.arange(self.cfg.num_selected_pages) * self.cfg.page_size
        self._slot_tokens[row] = (base + first).to(self._slot_tokens.device, non_blocking=True)
        return True

    def _wait_layer(self, layer: int, horizon: dict[int, int] | None = None) -> None:
        """Wait for the layer's offload jobs (with ``horizon``, only those writing a page
        below ``horizon[row]`` of one of its rows); a failed job fails the requests it wrote
        for."""
        if horizon is None:
            self._wait_where(layer, lambda _job: True)
        else:
            self._wait_where(layer, lambda job: job.writes_below(horizon))

    def _wait_where(self, layer: int, needed: Callable[[_Offload], bool]) -> None:
        wait, keep = [], []
        for job in self._pending[layer]:
            (wait if needed(job) else keep).append(job)
        self._pending[layer] = keep
        for job in wait:
            self._finish(layer, job, block=True)

    def _reap_layer(self, layer: int) -> None:
        """Collect the layer's offload jobs that already finished, without waiting for the
        others: a failed one fails its requests now. Dense layers never recall, so without
        this a failure of theirs would surface only at release, after the request finished."""
        self._pending[layer] = [
            job for job in self._pending[layer] if not self._finish(layer, job, block=False)
        ]

    def _finish(self, layer: int, job: _Offload, *, block: bool) -> bool:
        """Collect ``job`` if it is done (or, with ``block``, once it is); False if it is not."""
        if not job.ticket.done():
            if not block:
                return False
            self.offload_waits_total += 1
        try:
            job.ticket.wait()
        except FreeKVError as e:
            rows = sorted({row for row, _, _ in job.spans})
            self._fail(rows, f"FreeKV offload of layer {layer} failed: {e}")
        return True

    def _recall_horizon(self, rows: list[int]) -> dict[int, int]:
        """Per row: the first logical page that no selection of this decode step or of the
        speculative one for the next can choose (candidates end where the window starts, at
        ``ceil(L / p) - num_window_pages`` for a context of ``L`` tokens; the next step has
        one token more). A recall needs only the offload jobs writing pages below it.

        Every sparse layer of a step asks for the same rows: the answer is kept for the
        batch (reset by :meth:`begin_forward`) and only rows not seen yet are computed."""
        horizon = self._horizon
        p, w = self.cfg.page_size, self.cfg.num_window_pages
        for r in rows:
            if r not in horizon:
                n = self._batch_len.get(r)
                horizon[r] = self.state.max_pages if n is None else -(-(n + 1) // p) - w
        return horizon

    def _fail(self, rows: list[int], message: str) -> None:
        for row in rows:
            info = self._rows.get(row)
            if info is not None and row not in self._failed:
                info.failed = True
                self._failed[row] = (info.rid, message)
                logger.error("freekv: request %s: %s", info.rid, message)

    def failures(self) -> dict[str, str]:
        """Live requests (rid -> message) whose offload or recall failed and that were not
        aborted yet; the scheduler hook aborts each one and calls :meth:`clear_failure`. Their
        pages are freed on release as usual, so the pools stay consistent."""
        return {rid: msg for rid, msg in self._failed.values()}

    def clear_failure(self, rid: str) -> None:
        """The failure of ``rid`` was reported (its request is being aborted). The row stays
        marked failed until it is released: :meth:`publish_prefix` refuses it."""
        for row, (failed_rid, _msg) in list(self._failed.items()):
            if failed_rid == rid:
                del self._failed[row]

    def _wait_all(self) -> None:
        for layer in range(self.num_layers):
            self._wait_layer(layer)

    # --- lifecycle ----------------------------------------------------------------------------

    def attach_allocator(
        self,
        allocator: Any,
        req_to_token: Tensor,
        pool_kv: Callable[[int], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Reclaim device slots of offloaded pages into SGLang's ``allocator``.

        ``allocator`` is the :class:`~freekv_sglang.sglang.memory.FreeKVTokenAllocator` of this
        model runner and ``req_to_token`` its request-to-slot table; the allocator's capacity
        becomes bounded by the host pool (:meth:`host_headroom`). ``pool_kv(layer)`` gives
        SGLang's key and value buffers of a layer: with it, a reclaim first copies the dense
        layers' K/V of the pages into the dense store (without it dense layers read reclaimed
        pages from the host pool).
        """
        cap = self.host.pool.capacity_pages * self.cfg.page_size
        if cap < allocator.size:
            raise ValueError(
                f"the FreeKV host pool ({cap} tokens) is smaller than the device KV pool "
                f"({allocator.size} tokens); raise --freekv-host-pool-gb or lower "
                "--max-total-tokens"
            )
        self._allocator = allocator
        self._req_to_token = req_to_token
        self._pool_kv = pool_kv
        allocator.set_host_headroom(self.host_headroom)

    def host_headroom(self, device_tokens_in_use: int) -> int:
        """Tokens the host pool can still take, given the device slots SGLang has handed out.

        Every token of a live request is either on a device slot or reclaimed (then in the host
        pool). A live request still needs host pages for its tokens beyond the pages it holds;
        what is left is the free pages minus that need, so no request ever finds the host pool
        full while this stays non-negative. Without shared prefixes this is the capacity minus
        every live token; pages the prefix cache alone holds count as used (SGLang evicts them
        through the tree cache when it needs the room).
        """
        p = self.cfg.page_size
        pool = self.host.pool
        held = sum(len(info.host_pages) for info in self._rows.values())
        held += sum(len(pages) for pages, _jobs in self._released)  # free once jobs finish
        live = device_tokens_in_use + self.reclaimed_tokens
        return (pool.capacity_pages - pool.used_pages + held) * p - live

    def _reclaim(self, row: int, info: _Row, length: int) -> None:
        """Give back the device slots of ``row``'s pages that left the window for good.

        Called at a decode step of a sparse request, before any layer runs: pages
        ``[sink pages, window start)`` that are already in the host pool are read from there
        only in sparse layers (selection and recall), and from the dense-layer store in dense
        ones (:meth:`full_kv`; copied there first, and the pages keep their slots while the
        store is full); the window only moves forward. SGLang allocated this step's slots
        before the forward, so the freed slots go to a later step's requests.
        """
        assert self._allocator is not None and self._req_to_token is not None
        p = self.cfg.page_size
        window_start = max(-(-length // p) - self.cfg.num_window_pages, 0)
        lo = max(self._sink_pages, info.reclaimed_end)
        hi = min(window_start, info.offloaded)
        if hi <= lo:
            return
        span = self._req_to_token[row, lo * p : hi * p]
        if self._pool_kv is not None and self._dense_idx:
            if len(self._store_free) < hi - lo:
                self.reclaim_blocked_total += 1  # keep the slots until store pages free up
                return
            self._store_dense(info, span, hi - lo)
        self._allocator.free(span.to(torch.int64))
        span.fill_(RECLAIMED_SLOT)
        if info.reclaimed_end == 0:
            info.reclaimed_end = self._sink_pages
        new_idx = [self.host.pool.index_of(pid) for pid in info.host_pages[lo:hi]]
        info.reclaimed_idx = torch.cat(
            (info.reclaimed_idx, torch.tensor(new_idx, dtype=torch.int64))
        )
        self.reclaimed_tokens += (hi - info.reclaimed_end) * p
        self.reclaimed_total += (hi - info.reclaimed_end) * p
        self._reclaimed_since_admission = True
        info.reclaimed_end = hi

    def _store_dense(self, info: _Row, span: Tensor, n_pages: int) -> None:
        """Copy the dense layers' K/V at ``span`` (SGLang slots of ``n_pages`` whole pages) into
        new dense-store pages of ``info``, on the current stream, before the slots are freed
        (any later write into them is queued after this copy)."""
        assert self._pool_kv is not None
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

    def take_reclaim_event(self) -> bool:
        """True once after slots were reclaimed: SGLang's admission should look again."""
        event, self._reclaimed_since_admission = self._reclaimed_since_admission, False
        return event

    def has_reclaimed(self, row: int) -> bool:
        info = self._rows.get(row)
        return info is not None and info.reclaimed_end > self._sink_pages

    def full_kv(
        self,
        layer: int,
        row: int,
        length: int,
        k_cache: Tensor,
        v_cache: Tensor,
        req_to_token: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """All ``length`` keys and values of ``row`` in ``layer``, ``[length, H, D]`` each, in
        position order: device slots where the row has them, and for reclaimed pages the dense
        store (a dense layer, with one) or else the host pool. Used by dense layers of a request
        with reclaimed slots."""
        p = self.cfg.page_size
        info = self._rows[row]
        lo, hi = self._sink_pages, info.reclaimed_end
        head = req_to_token[row, : lo * p].to(torch.int64)
        tail = req_to_token[row, hi * p : length].to(torch.int64)
        store = self._dense_idx.get(layer)
        if store is not None and info.store_rows is not None:
            rows = info.store_rows
            k = torch.cat((k_cache[head], self._store_k[store][rows], k_cache[tail]))
            v = torch.cat((v_cache[head], self._store_v[store][rows], v_cache[tail]))
            return k, v
        self._wait_layer(layer)  # host pages are complete only once their tickets are done
        h, d = self.num_kv_heads, self.head_dim
        host = self._host_kv[info.reclaimed_idx, layer]  # [n, H, 2, p, D]
        hk = host[:, :, 0].permute(0, 2, 1, 3).reshape(-1, h, d).to(k_cache.device)
        hv = host[:, :, 1].permute(0, 2, 1, 3).reshape(-1, h, d).to(v_cache.device)
        k = torch.cat((k_cache[head], hk, k_cache[tail]))
        v = torch.cat((v_cache[head], hv, v_cache[tail]))
        return k, v

    def begin_forward(
        self,
        rows: list[int],
        seq_lens: list[int],
        rids: list[str] | None,
        decode: bool = False,
    ) -> None:
        """Adopt the batch's requests, allocate host pages for the pages this forward fills
        and, at a decode step with an allocator attached, reclaim device slots."""
        p = self.cfg.page_size
        self._batch_rows = rows
        self._batch_lens = seq_lens
        self._batch_len = dict(zip(rows, seq_lens, strict=True))
        self._horizon = {}
        if self._released:
            self._free_released(block=False)
        self._new_pages = []
        for i, (row, length) in enumerate(zip(rows, seq_lens, strict=True)):
            rid = rids[i] if rids is not None else str(row)
            info = self._rows.get(row)
            if info is None or info.rid != rid:
                if info is not None:
                    self.release(row)
                info = _Row(rid)
                self._rows[row] = info
                self.state.add_request(row)
                if rid in self._offers:
                    self._adopt_prefix(row, info, *self._offers.pop(rid))
            full = length // p
            if full > len(info.host_pages):
                have = len(info.host_pages)
                info.host_pages.extend(self._alloc_host(full - have))
                self._set_host_index(row, have, info.host_pages[have:])
            if full > info.offloaded:
                self._new_pages.append((row, info.offloaded, full))
            if decode and length > self.cfg.total_budget_tokens:
                if not self._take_region(row, info):
                    self.held_dense_total += 1
                elif self._allocator is not None:
                    self._reclaim(row, info, length)
        self._batch_sparse = [self.is_sparse(r) for r in rows] if decode else []
        self._batch_split = None
        self.peak_rows = max(self.peak_rows, len(self._rows))

    def _alloc_host(self, n: int) -> list[int]:
        """``n`` host pages; when the pool is short, cached prefixes no request holds go first
        (least recently used)."""
        try:
            return list(self.host.pool.alloc(n))
        except PoolExhaustedError:
            if self._released:
                self._free_released(block=True)
                if self.host.pool.free_pages >= n:
                    return list(self.host.pool.alloc(n))
            if self.prefix_tree is None:
                raise
            self.prefix_tree.evict(n - self.host.pool.free_pages)
            return list(self.host.pool.alloc(n))

    # --- shared prefixes ----------------------------------------------------------------------

    def enable_prefix_tree(self) -> HostPrefixTree:
        """Keep finished requests' full pages for reuse (the prefix cache's store)."""
        if self.prefix_tree is None:
            self.prefix_tree = HostPrefixTree(self.host.pool, self.cfg.page_size)
        return self.prefix_tree

    def offer_prefix(self, rid: str, page_ids: list[int], digests: list[Tensor | None]) -> None:
        """Request ``rid`` starts with these cached pages (its KV is loaded onto the device for
        the prefill): its row adopts them at its first forward instead of offloading them
        again. Takes one pool reference per page for the request."""
        self.drop_offer(rid)
        self.host.pool.retain(list(page_ids))
        self._offers[rid] = (list(page_ids), list(digests))

    def drop_offer(self, rid: str) -> None:
        """Give back an offer no row adopted (the request left before its prefill)."""
        offer = self._offers.pop(rid, None)
        if offer is not None and offer[0]:
            self.host.pool.release(offer[0])

    def _set_host_index(self, row: int, first: int, page_ids: list[int]) -> None:
        if page_ids:
            idx = [self.host.pool.index_of(pid) for pid in page_ids]
            self._host_index[row, first : first + len(idx)] = torch.tensor(idx, dtype=torch.int64)

    def _adopt_prefix(
        self, row: int, info: _Row, pages: list[int], digests: list[Tensor | None]
    ) -> None:
        info.host_pages = list(pages)
        info.offloaded = len(pages)
        self._set_host_index(row, 0, info.host_pages)
        self.prefix_pages_adopted_total += len(pages)
        if not pages or digests[0] is None:
            return
        stacked = torch.stack([d for d in digests if d is not None])  # [n, L, 2, H, D]
        for layer, ls in enumerate(self.state.layers):
            if not self.cfg.is_dense_layer(layer):
                ls.digests[row, : len(pages)] = stacked[:, layer].to(ls.digests.device)

    def load_prefix(
        self,
        page_ids: list[int],
        slots: Tensor,
        pool_kv: Callable[[int], tuple[Tensor, Tensor]],
    ) -> None:
        """Copy the K/V of host pages ``page_ids`` (every layer) to token ``slots`` of SGLang's
        pool (``len(page_ids) * page_size`` slots, in page order; ``pool_kv(layer)`` gives the
        layer's key and value buffers). The pages must be complete (published pages are).

        Per layer and chunk of pages: the recall op copies the pages from the host pool into a
        staging buffer (on a GPU the kernel reads the pinned pages directly, HND to NHD), and
        one indexed copy moves the staging rows to the slots. All on the current stream: the
        scheduler thread waits for nothing (except in the debug mode of
        :mod:`freekv_sglang.integrity`, which checks each page against its offload checksum and
        raises :class:`~freekv_sglang.integrity.PageChecksumError` on a mismatch)."""
        p, h, d = self.cfg.page_size, self.num_kv_heads, self.head_dim
        if slots.numel() != len(page_ids) * p:
            raise ValueError(
                f"{len(page_ids)} pages need {len(page_ids) * p} slots, got {slots.numel()}"
            )
        chunk = max(1, _LOAD_CHUNK_TOKENS // p)
        for first in range(0, len(page_ids), chunk):
            ids = page_ids[first : first + chunk]
            n = len(ids)
            idx = torch.tensor([self.host.pool.index_of(pid) for pid in ids], dtype=torch.int32)
            work = torch.stack(
                (
                    idx.repeat_interleave(h),
                    torch.zeros(n * h, dtype=torch.int32),
                    torch.arange(h, dtype=torch.int32).repeat(n),
                    (torch.arange(n, dtype=torch.int32) * p).repeat_interleave(h),
                ),
                dim=1,
            ).to(self.device, non_blocking=True)
            stage_k = torch.empty(n * p, h, d, dtype=self.dtype, device=self.device)
            stage_v = torch.empty_like(stage_k)
            dst = slots[first * p : (first + n) * p].to(self.device, torch.int64)
            for layer in range(self.num_layers):
                work[:, 1] = layer  # queued after the previous layer's recall read it
                _recall_one_layer(self._host_kv, layer, work, stage_k, stage_v)
                if self._verify_pages:
                    self._check_checksums(layer, ids, stage_k, stage_v)
                k_buf, v_buf = pool_kv(layer)
                k_buf[dst] = stage_k.to(k_buf.dtype)
                v_buf[dst] = stage_v.to(v_buf.dtype)

    def publish_prefix(self, row: int, token_ids: Any, namespace: Any) -> int:
        """Cache the full host pages of the request in ``row`` under ``token_ids`` (its prompt
        and output); returns the pages newly cached. A request whose offload or recall failed
        publishes nothing, whether or not its failure was reported yet; so does one whose
        conversion jobs end with an error now (they are waited for first)."""
        info = self._rows.get(row)
        if self.prefix_tree is None or info is None or info.failed:
            return 0
        # Published pages are read by later requests: complete the row's jobs first.
        for layer in range(self.num_layers):
            self._wait_where(layer, lambda job: job.writes_row(row))
        if info.failed:
            return 0
        n = min(len(token_ids) // self.cfg.page_size, info.offloaded)
        if n == 0:
            return 0
        by_layer = [ls.digests[row, :n] for ls in self.state.layers]  # L x [n, 2, H, D]
        per_page = list(torch.stack(by_layer, dim=1).unbind(0))  # n x [L, 2, H, D], a copy
        return self.prefix_tree.insert(namespace, token_ids, info.host_pages[:n], per_page)

    def after_kv_write(
        self, layer: int, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor
    ) -> None:
        """Offload the pages that became full in this forward and write their digests."""
        self._reap_layer(layer)
        if not self._new_pages:
            return
        p = self.cfg.page_size
        slots, page_ids, digest_at = [], [], []
        for row, first, end in self._new_pages:
            slots.append(req_to_token[row, first * p : end * p])
            page_ids.extend(self._rows[row].host_pages[first:end])
            digest_at.append((row, first, end))
        tok = torch.cat(slots).to(torch.int64)
        # Fresh tensors (the job keeps its inputs alive), so SGLang may reuse the slots at once.
        k = k_cache[tok]
        v = v_cache[tok]
        kc, vc, event = self._stage(k, v)
        if self._faults.armed and self._faults.hit(
            "conversion", [self._rows[r].rid for r, _, _ in self._new_pages]
        ):
            # The hook fails the next job a worker picks up: let the queue drain first, so
            # that it is this one.
            self._wait_all()
            self.host.workers.inject_failure(1)
        handle = None if event is None else event.cuda_event
        if self._verify_pages:
            self._record_checksums(layer, page_ids, k, v)
        ticket = self.host.offload_layer(layer, kc, vc, page_ids, handle)
        self._pending[layer].append(_Offload(ticket, list(self._new_pages), event))
        self.offload_jobs_total += 1
        if not self.cfg.is_dense_layer(layer):
            ls = self.state.layers[layer]
            h, d = self.num_kv_heads, self.head_dim
            dig = page_digests(k.view(-1, p, h, d), self.cfg.digest_kind).to(ls.digests.dtype)
            off = 0
            for row, first, end in digest_at:
                n = end - first
                ls.digests[row, first:end] = dig[off : off + n]
                off += n
        if layer == self.num_layers - 1:
            for row, _first, end in self._new_pages:
                self._rows[row].offloaded = end

    def _record_checksums(self, layer: int, page_ids: list[int], k: Tensor, v: Tensor) -> None:
        """Debug mode: remember what ``page_ids`` of ``layer`` must hold once offloaded (keyed
        by pool index, so a reused page's entry is overwritten by its next offload)."""
        p, h, d = self.cfg.page_size, self.num_kv_heads, self.head_dim
        sums = page_checksums(
            k.to(self.dtype).view(-1, p, h, d), v.to(self.dtype).view(-1, p, h, d)
        ).cpu()
        for pid, page_sum in zip(page_ids, sums, strict=True):
            idx = self.host.pool.index_of(pid)
            entry = self._page_sums.get(idx)
            if entry is None:
                entry = self._page_sums[idx] = torch.zeros(self.num_layers, 2, dtype=torch.int64)
            entry[layer] = page_sum

    def _check_checksums(self, layer: int, page_ids: list[int], k: Tensor, v: Tensor) -> None:
        """Debug mode: the loaded pages of ``layer`` (``[n * page_size, heads, dim]`` each)
        must equal what was offloaded into them; :class:`PageChecksumError` otherwise."""
        p, h, d = self.cfg.page_size, self.num_kv_heads, self.head_dim
        sums = page_checksums(k.view(-1, p, h, d), v.view(-1, p, h, d)).cpu()
        for i, pid in enumerate(page_ids):
            self.page_checks_total += 1
            entry = self._page_sums.get(self.host.pool.index_of(pid))
            if entry is None or not torch.equal(entry[layer], sums[i]):
                self.page_check_failures_total += 1
                raise PageChecksumError(
                    f"host page {pid} (layer {layer}) does not hold the K/V offloaded into it"
                    + (" (never offloaded)" if entry is None else "")
                )

    def _stage(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Host copies of ``k`` and ``v`` for a conversion job, and the CUDA event the job must
        wait for before reading them (None on CPU, where they are the tensors themselves).

        On CUDA the copy runs on the offload stream into pinned buffers, after the forward
        stream's gather: the scheduler thread goes on without waiting, and the conversion
        worker waits for the event instead. The gathered tensors are marked as used by the
        offload stream, so their memory is not reused before the copy read it."""
        stream = self._offload_stream
        if stream is None:
            return k, v, None
        stream.wait_stream(torch.cuda.current_stream(self.device))
        kc = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
        vc = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            kc.copy_(k, non_blocking=True)
            vc.copy_(v, non_blocking=True)
            # Blocking sync: the worker thread that waits for it sleeps instead of spinning.
            event = torch.cuda.Event(blocking=True)
            event.record(stream)
        k.record_stream(stream)
        v.record_stream(stream)
        return kc, vc, event

    def release(self, row: int) -> None:
        """The request in ``row`` left (finish, abort, retraction): free everything it held."""
        info = self._rows.pop(row, None)
        self._failed.pop(row, None)
        if info is None:
            return
        if self._recall_stream is not None:
            # Device-side order, no host wait: the forward stream's next work (this row's
            # reset below, a new owner zeroing the region) runs after what the recall stream
            # queued for the row. A queued recall may still read the row's host pages after
            # they are freed and rewritten; it writes only into this region, zeroed after it.
            torch.cuda.current_stream(self.device).wait_stream(self._recall_stream)
        if info.host_pages:
            self._free_host_pages(row, info.host_pages)
        self._host_index[row] = -1
        self._slot_tokens[row] = -1
        if info.slot_base >= 0:
            self._free_regions.append(info.slot_base)
        self._store_free.extend(info.store_pages)
        if info.reclaimed_end:
            self.reclaimed_tokens -= (info.reclaimed_end - self._sink_pages) * self.cfg.page_size
        self.state.release(row)
        self.drop_offer(info.rid)
        if not self._rows:
            self._free_released(block=True)  # idle: nothing waits on this
            pool = self.host.pool
            cached = self.prefix_tree.num_pages if self.prefix_tree is not None else 0
            logger.info(
                "freekv: idle, host pool %d/%d pages in use (%d cached prefix pages)",
                pool.used_pages,
                pool.capacity_pages,
                cached,
            )

    def _free_host_pages(self, row: int, pages: list[int]) -> None:
        """Free a released row's host pages, or park them while offload jobs still write
        them (a page freed earlier could be handed out and then overwritten by the old job)."""
        writing = [
            job
            for jobs in self._pending
            for job in jobs
            if job.writes_row(row) and not job.ticket.done()
        ]
        if writing:
            self._released.append((pages, writing))
        else:
            self.host.pool.release(pages)

    def _free_released(self, *, block: bool) -> None:
        """Free parked host pages whose jobs are done (with ``block``, all of them, after
        their jobs). Their requests are gone, so a failed job fails nobody."""
        still = []
        for pages, jobs in self._released:
            if not block and not all(job.ticket.done() for job in jobs):
                still.append((pages, jobs))
                continue
            for job in jobs:
                with contextlib.suppress(FreeKVError):
                    job.ticket.wait()
            self.host.pool.release(pages)
        self._released = still

    # --- decode -------------------------------------------------------------------------------

    def over_budget(self, seq_lens: Tensor) -> Tensor:
        return ~fits_budget(seq_lens, self.cfg)

    def is_sparse(self, row: int) -> bool:
        """Whether ``row`` decodes sparsely: it is over budget and holds a budget region (taken
        by :meth:`begin_forward` at a decode step). Over budget without one it is held dense,
        and attends its whole context from SGLang's pool like a request that fits."""
        info = self._rows.get(row)
        return info is not None and info.slot_base >= 0

    def batch_sparse(self) -> list[bool]:
        """:meth:`is_sparse` of each request of the decode batch :meth:`begin_forward` adopted
        last, in its order (empty after a prefill batch)."""
        return self._batch_sparse

    def batch_split(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Batch indices of the non-sparse and the sparse requests of that decode batch, on
        ``device``; made once per batch (every layer of the step reads them)."""
        if self._batch_split is None:
            flags = self._batch_sparse
            dense = [i for i, f in enumerate(flags) if not f]
            sparse = [i for i, f in enumerate(flags) if f]
            self._batch_split = (
                torch.tensor(dense, dtype=torch.int64, device=device),
                torch.tensor(sparse, dtype=torch.int64, device=device),
            )
        return self._batch_split

    def ensure_regions(self, rows: list[int]) -> None:
        """Give each of ``rows`` (requests over budget) a budget region if it has none; raises
        when none is free (callers decode only rows that :meth:`is_sparse` admits, or, in
        tests, fewer rows than there are regions)."""
        for r in rows:
            if not self._take_region(r, self._rows[r]):
                raise RuntimeError(
                    f"row {r}: no free budget region (all {self.max_sparse_requests} in use)"
                )

    def slot_buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """Budget-slot keys and values of ``layer``: ``[slots, H, D]`` each (NHD, page size 1)."""
        return self._k_slots[layer], self._v_slots[layer]

    def attended_tables(
        self, rows: list[int], seq_lens: list[int], req_to_token: Tensor
    ) -> AttendedTables:
        """Page tables of the attended tokens of ``rows`` (requests over budget, lengths
        including this step's token) for this decode step; see :class:`AttendedTables`.

        Requires :meth:`ensure_regions` for ``rows``. Built without a device sync
        (:func:`token_table`).
        """
        cfg = self.cfg
        p = cfg.page_size
        dev = req_to_token.device
        b = len(rows)
        ranges = []
        for r, n in zip(rows, seq_lens, strict=True):
            if n <= cfg.total_budget_tokens:
                raise ValueError(f"row {r}: {n} tokens fit the budget; it has no sparse table")
            win_start = max(-(-n // p) - cfg.num_window_pages, 0) * p
            ranges.append([(0, cfg.sink_tokens), (win_start, n)])
        fixed = token_table(rows, ranges, req_to_token)
        ones = fixed.kv_last_page_len
        base = torch.tensor([self._rows[r].slot_base for r in rows], dtype=torch.int64)
        if bool((base < 0).any()):
            raise ValueError("attended_tables needs ensure_regions for every row first")
        sel_idx = (base.unsqueeze(1) + torch.arange(self._region)).flatten()
        sel_indptr = (torch.arange(b + 1) * self._region).to(torch.int32)
        selected = PageTable(sel_indptr, sel_idx.to(dev, torch.int32), ones)
        return AttendedTables(fixed, selected)

    def slots_hold_selection(self, layer: int, rows: Tensor, pages: Tensor) -> bool:
        """True when every budget slot of ``rows`` holds a page of ``pages [B, H, K]`` for its
        KV head: the property that lets one page table per request serve every head."""
        s2p = self.state.layers[layer].slot_to_page[rows]  # [B, H, S]
        held = (s2p.unsqueeze(-1) == pages.unsqueeze(2)).any(-1) & (s2p >= 0)
        return bool(held.all())

    def _select_and_recall(
        self,
        ls: LayerState,
        layer: int,
        q: Tensor,
        rows: Tensor,
        seq_lens: Tensor,
        scale: float,
        heads: Tensor | None,
        row_list: list[int],
    ) -> Tensor:
        """Select pages with ``q`` at ``seq_lens``, make the selection of ``heads`` (``[B, H]``
        bool; None: every head) resident by a delta recall from the host pool, and count it.
        Returns the selection ``[B, H, K]`` (best first, -1 padded; -1 outside ``heads``).

        One op, :func:`freekv_sglang.ops.select_pages` (the CUDA kernel on a device, its
        reference on the CPU), scores the candidates, reduces over the GQA group, takes the
        top k per KV head, updates the residency maps and writes the recall work list (one
        row ``(host page, layer, head, token slot)`` per budget slot, -1 where the slot keeps
        its page); :func:`freekv_sglang.ops.recall_direct` then copies. Runs on the current
        stream; nothing comes back to the host."""
        cfg = self.cfg
        res = select_op.select_pages(
            q.to(ls.digests.dtype).contiguous(), ls.digests, rows.to(torch.int64),
            seq_lens.to(torch.int64), ls.slot_to_page, ls.page_to_slot,
            self._host_index, self._slot_tokens,
            page_size=cfg.page_size, num_sink_pages=cfg.num_sink_pages,
            num_window_pages=cfg.num_window_pages, top_k=cfg.num_selected_pages, layer=layer,
            reduction=cfg.gqa_reduction, scale=scale, head_mask=heads,
        )  # fmt: skip
        sums = res.counts.sum(1)  # [B, 3]: resident hits, pages recalled, pages selected
        if heads is None:
            selections = torch.full_like(sums[:, :1], self.num_kv_heads)
        else:
            selections = heads.sum(-1, keepdim=True)
        ls.count_block(rows, "selections", torch.cat((selections, sums), dim=1))
        # Host pages are complete only once their jobs are done; the pages this step's
        # selections can choose were written a window's worth of pages ago, so this waits
        # only where the window is a single page or after a prefill.
        self._wait_layer(layer, self._recall_horizon(row_list))
        k_buf, v_buf = self._k_slots[layer], self._v_slots[layer]
        try:
            if self._faults.armed and self._faults.hit(
                "recall", [self._rows[r].rid for r in row_list if r in self._rows]
            ):
                raise RecallError("injected recall failure (FREEKV_FAULTS)")
            _recall_one_layer(self._host_kv, layer, res.work, k_buf, v_buf)
        except (RecallError, RuntimeError) as e:
            # The rows' budget slots hold stale data now: fail those requests, not the batch.
            self._fail(sorted(set(row_list)), f"FreeKV recall into layer {layer} failed: {e}")
        return res.selected

    def sparse_decode(
        self,
        layer: int,
        q: Tensor,
        rows: Tensor,
        seq_lens: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        req_to_token: Tensor,
        scale: float,
        attend: AttendFn | None = None,
        row_list: list[int] | None = None,
    ) -> Tensor:
        """One FreeKV decode step of ``layer`` for requests over budget; returns ``[B, H_q, D]``.

        ``q [B, H_q, D]``; ``rows``/``seq_lens`` ``[B]`` int64 (lengths include this step's
        token, already written to the pool). ``attend`` replaces the torch attention over
        sink + selected + window (the FlashInfer backend passes its page-table attention);
        ``row_list`` is ``rows`` on the host when the caller has it (saves a device sync).

        Streams (CUDA): the correction and its recall run on the current (forward) stream,
        after it waited for this layer's speculative work of the previous step; the speculative
        selection and recall for the next step are queued on the recall stream after this
        layer's attention (they overwrite budget slots the attention reads), so the forward
        stream goes on with the next layer at once.
        """
        cfg = self.cfg
        ls = self.state.layers[layer]
        h = self.num_kv_heads
        b = q.shape[0]
        if row_list is None:
            row_list = [int(r) for r in rows.tolist()]
        self.ensure_regions(row_list)
        attend_fn: AttendFn = attend or (
            lambda layer, q, rows, lens, pages: self._attend(
                layer, q, rows, lens, pages, k_cache, v_cache, req_to_token, scale
            )
        )
        done = self._spec_done[layer]
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        if cfg.selection == "current":
            # Synchronous baseline: this step's query selects, recall waits, then attention.
            pages = self._select_and_recall(ls, layer, q, rows, seq_lens, scale, None, row_list)
            ls.count(rows, "steps", torch.ones(b, dtype=torch.int64, device=q.device))
            return attend_fn(layer, q, rows, seq_lens, pages)
        have_spec = ls.spec_len[rows] == seq_lens
        flags, _ = correction_flags(q, ls.prev_query[rows], h, cfg.tau)
        checked = have_spec & ls.has_prev[rows]
        corrected = flags & checked.unsqueeze(1)
        redo = corrected | ~have_spec.unsqueeze(1)
        # steps, checks, corrections
        one = torch.ones_like(have_spec, dtype=torch.int64)
        step = torch.stack((one, checked * h, corrected.sum(-1)), dim=1)
        ls.count_block(rows, "steps", step)
        # Correction: only the flagged heads are re-selected with this step's query (and
        # recalled, synchronously); the others attend the speculative pages already resident.
        now = self._select_and_recall(ls, layer, q, rows, seq_lens, scale, redo, row_list)
        pages = torch.where(redo.unsqueeze(-1), now, ls.spec_pages[rows])
        out = attend_fn(layer, q, rows, seq_lens, pages)
        # Speculative selection for step t+1 with this step's query, recalled off the forward
        # stream where there is one. A request over budget stays over it, so every head of
        # every row is selected.
        with self._on_recall_stream(q, rows, seq_lens) as stream:
            nxt = seq_lens + 1
            spec = self._select_and_recall(ls, layer, q, rows, nxt, scale, None, row_list)
            ls.spec_pages[rows] = spec
            ls.spec_len[rows] = nxt
            ls.prev_query[rows] = q.to(ls.prev_query.dtype)
            ls.has_prev[rows] = True
            if stream is not None:
                self._spec_done[layer] = stream.record_event()
        return out

    @contextlib.contextmanager
    def _on_recall_stream(self, *inputs: Tensor) -> Iterator[torch.cuda.Stream | None]:
        """Run the block on the recall stream once the forward stream's work so far (the
        layer's attention included) is done; ``inputs``, made on the forward stream, stay
        allocated until the recall stream used them. Without CUDA: in place."""
        stream = self._recall_stream
        if stream is None:
            yield None
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in inputs:
            t.record_stream(stream)
        with torch.cuda.stream(stream):
            yield stream

    def _attend(
        self,
        layer: int,
        q: Tensor,
        rows: Tensor,
        seq_lens: Tensor,
        pages: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        req_to_token: Tensor,
        scale: float,
    ) -> Tensor:
        """Attention over sink + selected (budget slots) + window tokens, per KV head.

        One batched computation: the sink and window token slots of every request form a
        ``[B, T]`` index (window positions past the request's length masked), the budget slots
        a ``[B, S*p]`` index; a budget slot counts for a KV head when the page it holds is
        selected for that head.
        """
        cfg = self.cfg
        p = cfg.page_size
        h, d = self.num_kv_heads, self.head_dim
        b = q.shape[0]
        dev = q.device
        ls = self.state.layers[layer]
        group = q.shape[1] // h
        lens = seq_lens.to(dev)
        n_pages = (lens + p - 1) // p
        win_start = (n_pages - cfg.num_window_pages).clamp(min=0) * p  # [B]
        win = cfg.num_window_pages * p
        sink_pos = torch.arange(cfg.sink_tokens, device=dev).expand(b, -1)
        win_pos = win_start.unsqueeze(1) + torch.arange(win, device=dev)  # [B, W]
        win_ok = win_pos < lens.unsqueeze(1)
        pos = torch.cat((sink_pos, torch.where(win_ok, win_pos, 0)), dim=1)  # [B, T]
        fixed_ok = torch.cat((torch.ones_like(sink_pos, dtype=torch.bool), win_ok), dim=1)
        tok = req_to_token[rows.to(req_to_token.device).unsqueeze(1), pos].to(torch.int64)
        kf = k_cache[tok]  # [B, T, H, D]
        vf = v_cache[tok]
        base = self._slot_tokens[rows.to(self._slot_tokens.device), 0].to(dev)  # region start
        slot_idx = base.unsqueeze(1) + torch.arange(self._region, device=dev)  # [B, S*p]
        ks = self._k_slots[layer][slot_idx]  # [B, S*p, H, D]
        vs = self._v_slots[layer][slot_idx]
        # A slot is attended when the page it holds is selected for this head.
        s2p = ls.slot_to_page[rows]  # [B, H, S]
        used = (s2p.unsqueeze(-1) == pages.unsqueeze(2)).any(-1) & (s2p >= 0)  # [B, H, S]
        slot_ok = used.repeat_interleave(p, dim=-1)  # [B, H, S*p]
        k_all = torch.cat((kf, ks), dim=1).permute(0, 2, 1, 3).float()  # [B, H, T', D]
        v_all = torch.cat((vf, vs), dim=1).permute(0, 2, 1, 3).float()
        ok = torch.cat((fixed_ok.unsqueeze(1).expand(-1, h, -1), slot_ok), dim=2)  # [B, H, T']
        qh = q.float().view(b, h, group, d)
        logits = torch.matmul(qh, k_all.transpose(2, 3)) * scale  # [B, H, G, T']
        logits = logits.masked_fill(~ok.unsqueeze(2), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.matmul(probs, v_all).reshape(b, -1, d).to(q.dtype)

    # --- observability ------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Counters since start (live and finished requests) and the host pool's use."""
        self._sync_recall_stream()  # the speculative recalls count too
        c = self.state.counters()
        sel = c["pages_selected"]
        pool = self.host.pool
        tree = self.prefix_tree
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
            "rows": len(self._rows),
            "rows_peak": self.peak_rows,
            "device_tokens_reclaimed": self.reclaimed_tokens,
            "device_tokens_reclaimed_total": self.reclaimed_total,
            "device_tokens_in_use": (
                self._allocator.size - self._allocator.device_available_size()
                if self._allocator is not None
                else -1
            ),
            "budget_regions_in_use": self.max_sparse_requests - len(self._free_regions),
            "budget_regions": self.max_sparse_requests,
            "held_dense_steps_total": self.held_dense_total,
            "dense_store_pages": self.dense_store_pages,
            "dense_store_pages_in_use": self.dense_store_pages - len(self._store_free),
            "reclaims_blocked_total": self.reclaim_blocked_total,
            "offload_jobs_total": self.offload_jobs_total,
            "offload_waits_total": self.offload_waits_total,
            "host_pages_parked": sum(len(pages) for pages, _jobs in self._released),
            "prefix_cache_on": tree is not None,
            "prefix_cache_pages": tree.num_pages if tree is not None else 0,
            "prefix_pages_adopted_total": self.prefix_pages_adopted_total,
            "prefix_hit_tokens_total": self.prefix_pages_adopted_total * self.cfg.page_size,
            "prefix_pages_evicted_total": tree.evicted_pages_total if tree is not None else 0,
            "page_checks_on": self._verify_pages,
            "page_checks_total": self.page_checks_total,
            "page_check_failures_total": self.page_check_failures_total,
        }

    def check_pools(self) -> bool:
        """Consistency of what this runtime holds: the host pool's own invariants, the
        reclaimed-slot count never negative, and nothing held once no request is live."""
        try:
            self.host.pool.check_invariants()
        except FreeKVError as e:
            logger.error("freekv: host pool inconsistent: %s", e)
            return False
        if self.reclaimed_tokens < 0:
            return False
        cached = 0
        if self.prefix_tree is not None:
            try:
                self.prefix_tree.check()
            except RuntimeError as e:
                logger.error("freekv: prefix cache inconsistent: %s", e)
                return False
            cached = self.prefix_tree.num_pages
        if not self._rows and not self._offers:
            return self.host.pool.used_pages == cached and self.reclaimed_tokens == 0
        return True

    def close(self) -> None:
        self._wait_all()
        self._free_released(block=True)
        self.host.close()


class RecallError(RuntimeError):
    """A recall of host pages into budget slots failed."""


@dataclass
class FaultPlan:
    """Failure injection for tests of the error paths, from ``FREEKV_FAULTS``: a comma list of

    - ``conversion:N`` / ``recall:N``: fail the N-th offload job / recall of this process
      (1-based);
    - ``conversion@PREFIX`` / ``recall@PREFIX``: fail the first offload job / recall that
      serves a request whose rid starts with ``PREFIX``, once per such request (so a test
      picks its victims by rid, whatever else the server ran before).

    Unset: inert."""

    at: dict[str, int] = field(default_factory=dict)
    prefix: dict[str, str] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    hit_rids: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def from_env(cls) -> FaultPlan:
        spec = os.environ.get("FREEKV_FAULTS", "").strip()
        plan = cls()
        for part in filter(None, (x.strip() for x in spec.split(","))):
            kind, sep, arg = part.partition("@")
            if sep and kind in ("conversion", "recall") and arg:
                plan.prefix[kind] = arg
                continue
            kind, _, n = part.partition(":")
            if kind not in ("conversion", "recall") or not n.isdigit() or int(n) < 1:
                raise ValueError(
                    f"FREEKV_FAULTS: {part!r} is not conversion:N, recall:N (N >= 1), "
                    "conversion@RID_PREFIX or recall@RID_PREFIX"
                )
            plan.at[kind] = int(n)
        return plan

    @property
    def armed(self) -> bool:
        """Whether any fault is planned (unarmed, the per-step callers skip :meth:`hit`)."""
        return bool(self.at or self.prefix)

    def hit(self, kind: str, rids: list[str] | tuple[str, ...] = ()) -> bool:
        """Whether this ``kind`` of operation, serving requests ``rids``, must fail."""
        hit = False
        want = self.prefix.get(kind)
        if want is not None:
            for rid in rids:
                if rid.startswith(want) and (kind, rid) not in self.hit_rids:
                    self.hit_rids.add((kind, rid))
                    hit = True
        if kind in self.at:
            self.seen[kind] = self.seen.get(kind, 0) + 1
            hit = hit or self.seen[kind] == self.at[kind]
        return hit


def _recall_one_layer(
    host_kv: Tensor, layer: int, work: Tensor, k_buf: Tensor, v_buf: Tensor
) -> None:
    """Copy work rows ``(host_page, layer, head, slot)`` into one layer's NHD slot buffers
    (rows with host page -1 are skipped). Every row names ``layer``; the op takes one buffer
    per host layer, all of one shape, so this layer's buffers stand in every position."""
    n = host_kv.shape[1]
    recall_direct(host_kv, work, None, [k_buf] * n, [v_buf] * n)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def install(runtime: FreeKVRuntime | None) -> None:
    """Make ``runtime`` this process's runtime (closing a previous one)."""
    global _current
    if _current is not None and _current is not runtime:
        _current.close()
    _current = runtime
