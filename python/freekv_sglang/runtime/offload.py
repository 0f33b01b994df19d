"""Offload of full pages into the host pool: staging, conversion jobs, and parked pages.

:class:`OffloadQueue` is driven by the facade on the scheduler thread; the only other threads
are the Rust conversion workers of :class:`~freekv_sglang.host_pool.HostKVPool`, and what they
write is fenced by their tickets:

- :meth:`OffloadQueue.submit` (per layer, right after SGLang wrote the layer's K/V) hands one
  layer's newly full pages to the conversion workers (NHD -> HND) as one job, kept in
  ``pending[layer]``. On CUDA the pages are first copied into pinned staging buffers on the
  offload stream, and the job's worker thread waits for that copy's event: the scheduler
  thread never waits for a device-to-host copy;
- :meth:`OffloadQueue.wait_layer` blocks until the jobs that a reader needs are done: a host
  page is never read (recall, dense-layer read, publish) before its conversion finished.
  :meth:`OffloadQueue.reap` collects finished jobs without waiting, so a failed job fails its
  requests at the next forward even in layers that never recall;
- :meth:`OffloadQueue.free_or_park` (release of a request): host pages that jobs still write
  are parked until those jobs are done (a page freed earlier could be handed out and then
  overwritten by the old job); :meth:`OffloadQueue.free_parked` frees them, at each forward
  without waiting, or waiting when the pool runs short or no request is left.

A failed job calls ``on_fail(rows, message)`` for the rows it wrote; its requests are aborted
by the scheduler hook (see :meth:`~freekv_sglang.runtime.facade.FreeKVRuntime.failures`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from freekv_sglang.host_pool import FreeKVError, HostKVPool, PoolExhaustedError, Ticket
from freekv_sglang.prefix_tree import HostPrefixTree

__all__ = ["OffloadJob", "OffloadQueue"]

#: ``(row, first page, end page)``: a row's logical pages ``[first, end)``.
Span = tuple[int, int, int]


class OffloadJob(NamedTuple):
    """One offload job: one layer's pages that became full in one forward."""

    ticket: Ticket
    spans: list[Span]  # the rows' pages the job writes
    # CUDA: the event recorded after the device-to-host copy of the job's staging buffers
    # (the job waits for it; kept alive here until the ticket is done). None on CPU.
    event: Any

    def writes_below(self, horizon: dict[int, int]) -> bool:
        """Whether the job writes a page of a row in ``horizon`` below that row's bound."""
        return any(first < horizon.get(row, -1) for row, first, _ in self.spans)

    def writes_row(self, row: int) -> bool:
        return any(r == row for r, _, _ in self.spans)


class OffloadQueue:
    """The conversion jobs of every layer and the host pages parked behind them."""

    def __init__(
        self,
        host: HostKVPool,
        dtype: torch.dtype,
        device: torch.device,
        on_fail: Callable[[list[int], str], None],
    ) -> None:
        self.host = host
        g = host.geometry
        num_layers = g.num_layers
        # The host pool's pages as ``[pages, layers, KV heads, K/V, page size, head dim]``
        # (HND per page and layer: what the recall op reads).
        self.host_kv = (
            host.pool.arena_view()
            .view(dtype)
            .view(host.pool.capacity_pages, num_layers, g.num_kv_heads, 2, g.page_size, g.head_dim)
        )
        self._on_fail = on_fail
        # The offload stream (CUDA only): copies each layer's newly full pages into pinned
        # staging buffers after the forward stream's K/V write.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._device = device
        # Jobs per layer, oldest first; a job leaves the list once it was waited for.
        self.pending: list[list[OffloadJob]] = [[] for _ in range(num_layers)]
        # Host pages of released requests that jobs still write, with those jobs.
        self.parked: list[tuple[list[int], list[OffloadJob]]] = []
        self.jobs_total = 0
        self.waits_total = 0  # waits of the scheduler thread on an unfinished job

    def alloc(self, n: int, tree: HostPrefixTree | None) -> list[int]:
        """``n`` host pages for pages about to fill; when the pool is short, parked pages are
        waited for, then cached prefixes no request holds go (least recently used)."""
        pool = self.host.pool
        try:
            return list(pool.alloc(n))
        except PoolExhaustedError:
            if self.parked:
                self.free_parked(block=True)
                if pool.free_pages >= n:
                    return list(pool.alloc(n))
            if tree is None:
                raise
            tree.evict(n - pool.free_pages)
            return list(pool.alloc(n))

    # --- submit ---------------------------------------------------------------------------

    def submit(self, layer: int, k: Tensor, v: Tensor, page_ids: list[int], spans: list[Span]):
        """Offload ``k``/``v`` (``[n * page_size, H, D]`` each, fresh tensors: the job keeps
        them alive, so SGLang may reuse the slots they came from at once) into host pages
        ``page_ids`` of ``layer``."""
        kc, vc, event = self._stage(k, v)
        handle = None if event is None else event.cuda_event
        ticket = self.host.offload_layer(layer, kc, vc, page_ids, handle)
        self.pending[layer].append(OffloadJob(ticket, list(spans), event))
        self.jobs_total += 1

    def _stage(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Host copies of ``k`` and ``v`` for a conversion job, and the CUDA event the job must
        wait for before reading them (None on CPU, where they are the tensors themselves).

        On CUDA the copy runs on the offload stream into pinned buffers, after the forward
        stream's gather: the scheduler thread goes on without waiting, and the conversion
        worker waits for the event instead. The gathered tensors are marked as used by the
        offload stream, so their memory is not reused before the copy read it."""
        stream = self._stream
        if stream is None:
            return k, v, None
        stream.wait_stream(torch.cuda.current_stream(self._device))
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

    # --- wait -----------------------------------------------------------------------------

    def wait_layer(self, layer: int, horizon: dict[int, int] | None = None) -> None:
        """Wait for the layer's jobs (with ``horizon``, only those writing a page below
        ``horizon[row]`` of one of its rows); a failed job fails the requests it wrote for."""
        if horizon is None:
            self.wait_where(layer, lambda _job: True)
        else:
            self.wait_where(layer, lambda job: job.writes_below(horizon))

    def wait_where(self, layer: int, needed: Callable[[OffloadJob], bool]) -> None:
        wait: list[OffloadJob] = []
        keep: list[OffloadJob] = []
        for job in self.pending[layer]:
            (wait if needed(job) else keep).append(job)
        self.pending[layer] = keep
        for job in wait:
            self._finish(layer, job, block=True)

    def complete_row(self, row: int) -> None:
        """Wait for every job that writes a page of ``row`` (before its pages are published)."""
        for layer in range(len(self.pending)):
            self.wait_where(layer, lambda job: job.writes_row(row))

    def wait_all(self) -> None:
        for layer in range(len(self.pending)):
            self.wait_layer(layer)

    def reap(self, layer: int) -> None:
        """Collect the layer's jobs that already finished, without waiting for the others."""
        self.pending[layer] = [
            job for job in self.pending[layer] if not self._finish(layer, job, block=False)
        ]

    def _finish(self, layer: int, job: OffloadJob, *, block: bool) -> bool:
        """Collect ``job`` if it is done (or, with ``block``, once it is); False if it is not."""
        if not job.ticket.done():
            if not block:
                return False
            self.waits_total += 1
        try:
            job.ticket.wait()
        except FreeKVError as e:
            rows = sorted({row for row, _, _ in job.spans})
            self._on_fail(rows, f"FreeKV offload of layer {layer} failed: {e}")
        return True

    def read(self, idx: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """K and V of host pool pages ``idx`` in ``layer``, ``[n * page_size, H, D]`` each
        (NHD), once the layer's jobs are done (dense layers of requests with reclaimed slots
        and no dense-layer store)."""
        self.wait_layer(layer)
        host = self.host_kv[idx, layer]  # [n, H, 2, p, D]
        h, d = host.shape[1], host.shape[-1]
        k = host[:, :, 0].permute(0, 2, 1, 3).reshape(-1, h, d)
        v = host[:, :, 1].permute(0, 2, 1, 3).reshape(-1, h, d)
        return k, v

    # --- parked pages ---------------------------------------------------------------------

    def free_or_park(self, row: int, pages: list[int]) -> None:
        """Free a released row's host pages, or park them while jobs still write them."""
        writing = [
            job
            for jobs in self.pending
            for job in jobs
            if job.writes_row(row) and not job.ticket.done()
        ]
        if writing:
            self.parked.append((pages, writing))
        else:
            self.host.pool.release(pages)

    def free_parked(self, *, block: bool) -> None:
        """Free parked host pages whose jobs are done (with ``block``, all of them, after
        their jobs). Their requests are gone, so a failed job fails nobody."""
        still = []
        for pages, jobs in self.parked:
            if not block and not all(job.ticket.done() for job in jobs):
                still.append((pages, jobs))
                continue
            for job in jobs:
                with contextlib.suppress(FreeKVError):
                    job.ticket.wait()
            self.host.pool.release(pages)
        self.parked = still

    @property
    def parked_pages(self) -> int:
        return sum(len(pages) for pages, _jobs in self.parked)
