"""FreeKV's decode step for requests over budget: correction, selection, recall, speculation.

:class:`SparseDecode` is driven per sparse layer and decode step by the page-table decode
(:class:`~freekv_sglang.runtime.paged_decode.FreeKVPagedDecode`, through the facade), on the
scheduler thread, in three phases around the attention:

The per-layer state is indexed by budget region, never by SGLang's request rows: the residency
and speculation state (:class:`~freekv_sglang.state.FreeKVState` with one row per region), the
host-page map (:class:`~freekv_sglang.runtime.rows.HostIndex`); the digests are indexed by host
page (:attr:`SparseDecode.digests`, written when a page is offloaded, so a page shared through
the prefix cache has one copy of them). Callers pass ``regs`` (the requests' regions, on the
device) next to ``rows`` (their SGLang rows, on the host: recall horizons, faults, failures).

The step is split into host bookkeeping and a static device part. :meth:`SparseDecode.prepare`
(host, once per decode batch, before any layer) writes the batch's regions and lengths into
buffers allocated once (:attr:`SparseDecode.step_buffers`), waits for the offload jobs that
write a page a selection of this step can choose and consults the fault plan;
:meth:`SparseDecode.step` (per sparse layer) is the device part: every op it queues has shapes
fixed by the batch size and reads only those buffers, the layer's state, the digests, the
budget slots and the host pool, never a device value on the host, so its op sequence is the
same at every step of a batch size (``tests/runtime/test_static_step.py`` records it) and a
CUDA graph can hold it. The offload of the pages that filled in a step can follow the step:
with a window of two pages or more, a page that fills at step t stays in the window of the
selections of steps t and t + 1 (candidates end ``num_window_pages`` pages before the last),
so none reads its digest or host page before the next step's host part waits for its job.
With one window page the speculation of step t can choose it: the waits then stay in each
layer's step (``inline`` host checks), which no graph can hold.

1. :meth:`SparseDecode.correct` (forward stream, after it waited for this layer's speculative
   work of the previous step): the correction op (:func:`~freekv_sglang.ops.correction_masks`,
   one launch over the regions' speculation state) flags the KV heads whose query moved (cosine
   with the previous query below ``tau``); only those heads, and heads without a speculative
   selection, are re-selected with this step's query and recalled, synchronously. With
   ``selection == "current"`` (the synchronous baseline) every head is. Returns the pages the
   budget slots now hold, ``[B, H, K]``;
2. the caller attends sink + window + budget slots;
3. :meth:`SparseDecode.speculate`: this step's query selects the pages of step t+1 and their
   delta is recalled, on the recall stream (CUDA) after the layer's attention, so the forward
   stream goes on with the next layer at once; the same select op
   (:class:`~freekv_sglang.ops.SpeculationCommit`) writes the selection, its length and its
   query into the regions' state and adds the step's counters, and ``_spec_done[layer]`` is
   recorded after the recall.

Every selection is one op, :func:`freekv_sglang.ops.select_pages` (scores, GQA reduction,
top-k, residency update and the recall work list), and every recall another,
:func:`freekv_sglang.ops.recall_direct` (kernels on a device, references on the CPU): with
the correction's, a speculative sparse layer queues five FreeKV ops (seven kernels) and its
attention, and nothing else. The
host checks wait for the offload jobs that write a page below the recall horizon (the only
pages a selection of this step or the next can choose) before any recall is queued.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import (
    Rerank,
    SpeculationCommit,
    correction_masks,
    page_digest,
    quantize_page_keys,
    recall_direct,
    select_pages,
)
from freekv_sglang.runtime.checks import HostChecks
from freekv_sglang.runtime.faults import FaultPlan, InvariantError, RecallError
from freekv_sglang.runtime.offload import OffloadQueue
from freekv_sglang.runtime.regions import BudgetRegions
from freekv_sglang.runtime.tables import TableBuffers
from freekv_sglang.state import FreeKVState, LayerState

__all__ = ["SparseDecode", "recall_one_layer"]

_REGS, _LENS, _NEXT, _LIVE = range(4)


def recall_one_layer(
    host_kv: Tensor, layer: int, work: Tensor, k_buf: Tensor, v_buf: Tensor
) -> None:
    """Copy work rows ``(host_page, layer, head, slot)`` into one layer's NHD slot buffers
    (rows with host page -1 are skipped). Every row names ``layer``; the op takes one buffer
    per host layer, all of one shape, so this layer's buffers stand in every position."""
    n = host_kv.shape[1]
    recall_direct(host_kv, work, [k_buf] * n, [v_buf] * n)


class SparseDecode:
    """Correction, selection, recall and speculation of every sparse layer (see module doc)."""

    def __init__(
        self,
        cfg: FreeKVConfig,
        state: FreeKVState,
        regions: BudgetRegions,
        host_index: Tensor,
        host_kv: Tensor,
        host_pages: int,
        offload: OffloadQueue,
        faults: FaultPlan,
        rids: Callable[[list[int]], list[str]],
        fail: Callable[[list[int], str], None],
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self._regions = regions
        self._host_index = host_index
        self._host_kv = host_kv
        self._fail = fail
        self._checks = HostChecks(cfg, state.max_pages, offload, faults, rids, fail)
        self._device = device
        self._h = state.num_kv_heads
        # Digest store of each sparse layer (None for dense layers): ``[host pages, 2, H, D]``,
        # lo/hi of each host page's keys, in the keys' dtype.
        shape = (host_pages, 2, state.num_kv_heads, state.head_dim)
        self.digests: list[Tensor | None] = [
            None
            if cfg.is_dense_layer(layer)
            else torch.empty(shape, dtype=state.dtype, device=device)
            for layer in range(state.num_layers)
        ]
        # With re-ranking: the key codes of each sparse layer's host pages (the copy its second
        # stage reads, freekv_sglang.ops.rerank), ``[host pages, H, p, D * bits / 8]`` uint8.
        bits = cfg.rerank_bits
        codes = (host_pages, state.num_kv_heads, cfg.page_size, state.head_dim * bits // 8)
        self.codes: list[Tensor | None] = [
            torch.empty(codes, dtype=torch.uint8, device=device) if d is not None and cfg.rerank
            else None
            for d in self.digests
        ]  # fmt: skip
        # The recall stream (CUDA only) and, per layer, the event after its speculative work.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._spec_done: list[Any] = [None] * state.num_layers
        # The step's device inputs, written by prepare(): per request of the batch, its budget
        # region, its length, the next step's length and whether it is live (1) or an inert
        # padding row (0) (rows of one int64 tensor: one copy).
        self.step_buffers = torch.zeros(4, regions.count, dtype=torch.int64, device=device)
        # Their attended tables (written by the page-table decode's plan).
        self.tables = TableBuffers(cfg, regions.count, regions.size, device)
        self._masked = False  # inert rows may be in a batch: counters masked (reserve())
        self._batch = 0  # requests of the prepared batch
        self._rows: list[int] = []  # their SGLang rows (host checks)
        self._inline = False  # host checks per layer, inside the step (a one-page window)
        self._live: Tensor | None = None  # the step's live flags, when masked
        # What a correction leaves for the speculation's commit, per layer: its head masks and
        # its selection's counts.
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}
        # Forward-stream tensors the recall stream reads in a capture, until the join.
        self._held: list[Tensor] = []

    def reserve(self, rows: int) -> None:
        """Batches of up to ``rows`` requests from now on, some of them inert (a padded batch
        of a CUDA graph): the step buffers and tables are allocated once more, for ``rows``,
        before any capture (their addresses never change again), and every step masks the
        counters of inert rows."""
        rows = max(rows, self.step_buffers.shape[1])
        dev = self._device
        self.step_buffers = torch.zeros(4, rows, dtype=torch.int64, device=dev)
        self.tables = TableBuffers(self.cfg, rows, self._regions.size, dev)
        self._masked = True

    def new_batch(self, batch_len: dict[int, int]) -> None:
        """A new forward batch (row -> length including its new tokens)."""
        self._checks.new_batch(batch_len)

    def write_digests(self, layer: int, k: Tensor, pool_idx: Tensor) -> None:
        """Digests of the pages that filled in this forward (the digest op over their gathered
        keys ``k``, ``[n * page_size, H, D]``) into the store entries of their host pages
        (``pool_idx [n]``, CPU), on the current stream before any selection that reads them."""
        digests = self.digests[layer]
        if digests is None:
            return
        p = self.cfg.page_size
        dev = k.device
        keys = k.to(digests.dtype)
        idx = pool_idx.to(dev, non_blocking=True)
        page_digest(
            keys, torch.arange(pool_idx.numel(), dtype=torch.int64, device=dev) * p, idx,
            digests, p, self.cfg.digest_kind,
        )  # fmt: skip
        codes = self.codes[layer]
        if codes is not None:  # the key copy of the re-ranking, between the digest's min and max
            pages = keys.view(-1, p, *keys.shape[1:])
            codes[idx] = quantize_page_keys(pages, self.cfg.rerank_bits)

    def tensors(self) -> list[Tensor]:
        step = [self.step_buffers, *self.tables.tensors()]
        stores = [t for t in (*self.digests, *self.codes) if t is not None]
        return [*stores, *step]

    # --- host part of a step --------------------------------------------------------------

    def prepare(
        self,
        rows: list[int],
        regions: list[int],
        seq_lens: list[int],
        live: list[bool] | None = None,
    ) -> None:
        """Host part before a decode step of the requests over budget in ``rows`` (their
        budget ``regions``, their lengths including this step's token): write the step
        buffers, then, unless the window is a single page, the host checks of every sparse
        layer (offload waits, faults) in the order the layers' steps would make them.
        ``live`` (after :meth:`reserve`): False for an inert row (it selects nothing in a
        region no request holds, and adds to no counter)."""
        b = len(rows)
        if not len(regions) == len(seq_lens) == b:
            raise ValueError(f"{b} rows, {len(regions)} regions, {len(seq_lens)} lengths")
        if b > self.step_buffers.shape[1]:
            raise InvariantError(f"{b} requests over budget, {self.step_buffers.shape[1]} regions")
        if live is not None and not self._masked and not all(live):
            raise InvariantError("inert rows in a batch before reserve()")
        alive = [True] * b if live is None else live
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        flags = torch.tensor(alive, dtype=torch.int64)
        host = torch.stack((torch.tensor(regions, dtype=torch.int64), lens, lens + 1, flags))
        # The previous step's speculations (recall stream) read these buffers: the write waits
        # for them on the device (no host wait). It exposes at most the last layer's
        # speculation per step; each layer's correction waits for its own anyway.
        self.order_after_recall()
        self.step_buffers[:, :b].copy_(host, non_blocking=True)
        rows = [r for r, ok in zip(rows, alive, strict=True) if ok]
        self._batch, self._rows = b, rows
        self._inline = self.cfg.num_window_pages < 2
        if self._inline:
            return
        for layer in range(self.state.num_layers):
            if self.digests[layer] is not None:
                self._checks.run(layer, rows)
                if self.cfg.selection != "current":
                    self._checks.run(layer, rows)

    # --- device part of a step ------------------------------------------------------------

    def step(
        self, layer: int, q: Tensor, scale: float, attend: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """The prepared step of ``layer`` for ``q [B, H_q, D]`` (the prepared requests, in
        order): correction, ``attend(q)``, speculation; returns the attention's output."""
        b = self._batch
        if q.shape[0] != b:
            raise ValueError(f"q has {q.shape[0]} requests, the prepared step {b}")
        buf = self.step_buffers
        regs, lens, nxt = buf[_REGS, :b], buf[_LENS, :b], buf[_NEXT, :b]
        self._live = buf[_LIVE, :b] if self._masked else None
        rows = self._rows if self._inline else None
        self.correct(layer, q, regs, lens, scale, rows, selection=False)
        out = attend(q)
        self.speculate(layer, q, regs, lens, scale, rows, next_lens=nxt)
        return out

    # --- the three phases -----------------------------------------------------------------

    def correct(
        self,
        layer: int,
        q: Tensor,
        regs: Tensor,
        seq_lens: Tensor,
        scale: float,
        rl: list[int] | None,
        selection: bool = True,
    ) -> Tensor | None:
        """Phase 1: make this step's selection resident; returns it ``[B, H, K]`` if asked
        (``selection``). With ``rl`` (the requests' SGLang rows) it runs the selection's host
        checks first (else :meth:`prepare` did). Speculating, :meth:`speculate` must follow
        for the layer: it adds the counters of both."""
        ls = self.state.layers[layer]
        done = self._spec_done[layer]
        if done is not None:
            torch.cuda.current_stream(self._device).wait_event(done)
        rows = self._rows if rl is None else rl
        if rl is not None:
            self._checks.run(layer, rl)
        if self.cfg.selection == "current":
            pages, cnt = self._select_and_recall(ls, layer, q, regs, seq_lens, scale, None, rows)
            one = torch.ones_like(regs) if self._live is None else self._live
            if self._live is not None:
                cnt = cnt * self._live.view(-1, 1, 1)
            ls.count(regs, "steps", one)
            sel = torch.cat((one.unsqueeze(1) * self._h, cnt.sum(1)), dim=1)
            ls.count_block(regs, "selections", sel)
            return pages
        # The masks of the heads to re-select (``masks[2]``): those flagged by the cosine rule
        # where a speculative selection made for this length exists (spec_len is set with
        # prev_query and cleared with it, so it can be checked), and every head where none does.
        q_state = q.to(ls.prev_query.dtype).contiguous()
        masks = correction_masks(
            q_state, ls.prev_query, regs, seq_lens, ls.spec_len, self._h, self.cfg.tau
        )
        redo = masks[2]
        now, cnt = self._select_and_recall(ls, layer, q, regs, seq_lens, scale, redo, rows)
        self._pending[layer] = (masks, cnt)
        if not selection:
            return None
        return torch.where(redo.unsqueeze(-1), now, ls.spec_pages[regs])

    def speculate(
        self,
        layer: int,
        q: Tensor,
        regs: Tensor,
        seq_lens: Tensor,
        scale: float,
        rl: list[int] | None,
        next_lens: Tensor | None = None,
    ) -> None:
        """Phase 3: select and recall the pages of step t+1 with this step's query (a request
        over budget stays over it, so every head of every row is selected), then add the
        step's counters. ``rl``: as for :meth:`correct`; ``next_lens``: ``seq_lens + 1`` when
        the caller has it."""
        if self.cfg.selection == "current":
            return
        rows = self._rows if rl is None else rl
        if rl is not None:
            self._checks.run(layer, rl)
        ls = self.state.layers[layer]
        masks, cnt = self._pending.pop(layer)
        with self._on_recall_stream(q, regs, seq_lens, masks, cnt) as stream:
            nxt = seq_lens + 1 if next_lens is None else next_lens
            commit = SpeculationCommit(
                self._live, masks, cnt, ls.spec_pages, ls.spec_len, ls.prev_query, ls.counts
            )
            self._select_and_recall(ls, layer, q, regs, nxt, scale, None, rows, commit)
            if stream is not None:
                self._spec_done[layer] = stream.record_event()

    def _rerank(self, layer: int) -> Rerank | None:
        codes = self.codes[layer]
        if codes is None:
            return None
        return Rerank(codes, self.cfg.rerank_bits, self.cfg.rerank_candidates)

    def slots_hold_selection(self, layer: int, regs: Tensor, pages: Tensor) -> bool:
        """True when every budget slot of ``regs`` holds a page of ``pages [B, H, K]`` for its
        KV head: the property that lets one page table per request serve every head."""
        s2p = self.state.layers[layer].slot_to_page[regs]  # [B, H, S]
        held = (s2p.unsqueeze(-1) == pages.unsqueeze(2)).any(-1) & (s2p >= 0)
        return bool(held.all())

    # --- streams --------------------------------------------------------------------------

    def end_step(self) -> None:
        """After the last layer of a step whose next step runs on the same stream with no
        event between them (a CUDA graph's forward, captured whole: a capture must end with
        the streams it forked joined, and may not wait on an event recorded outside it): join
        the recall stream into the current one and drop the per-layer speculation events, so
        the next step's corrections are ordered after this step's speculations by the stream
        alone. The last layer's speculation is then on the step's critical path."""
        self.order_after_recall()
        self._spec_done = [None] * self.state.num_layers

    def order_after_recall(self) -> None:
        """Device-side order, no host wait: the current stream's next work runs after what the
        recall stream queued (release: a new owner zeroes the region after its recalls). The
        inputs held for a capture (:meth:`_on_recall_stream`) can be freed after it."""
        if self._stream is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
        self._held.clear()

    def sync(self) -> None:
        """Host-side wait for the recall stream (before its counters are read)."""
        if self._stream is not None:
            self._stream.synchronize()

    @contextlib.contextmanager
    def _on_recall_stream(self, *inputs: Tensor) -> Iterator[torch.cuda.Stream | None]:
        """Run the block on the recall stream once the forward stream's work so far (the
        layer's attention included) is done; ``inputs``, made on the forward stream, stay
        allocated until the recall stream used them. Eager: ``record_stream``. Under capture
        the allocator records no stream use, and a block freed on the forward stream is
        handed to the next allocation on it in the same capture (the graph's private pool
        recycles it): the replayed forward stream would then overwrite it while the recall
        stream still reads it (on the first GPU run, the step counters held garbage). So a
        capture holds them until :meth:`order_after_recall` joins the streams. Without CUDA:
        in place."""
        stream = self._stream
        if stream is None:
            yield None
            return
        stream.wait_stream(torch.cuda.current_stream(self._device))
        if torch.cuda.is_current_stream_capturing():
            self._held.extend(inputs)
        else:
            for t in inputs:
                t.record_stream(stream)
        with torch.cuda.stream(stream):
            yield stream

    # --- selection and recall -------------------------------------------------------------

    def _select_and_recall(
        self,
        ls: LayerState,
        layer: int,
        q: Tensor,
        regs: Tensor,
        seq_lens: Tensor,
        scale: float,
        heads: Tensor | None,
        rows: list[int],
        commit: SpeculationCommit | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Select pages with ``q`` at ``seq_lens`` and make the selection of ``heads``
        (``[B, H]`` bool; None: every head) resident by a delta recall. Returns the selection
        ``[B, H, K]`` (best first, -1 padded; -1 outside ``heads``) and the select op's counts
        ``[B, H, 3]`` (0 outside ``heads``). On the current stream, after the host checks
        (:class:`~freekv_sglang.runtime.checks.HostChecks`) of this selection."""
        cfg = self.cfg
        digests = self.digests[layer]
        if digests is None:
            raise InvariantError(f"layer {layer} is dense: it has no digests to select from")
        res = select_pages(
            q.to(digests.dtype).contiguous(), digests, regs.to(torch.int64),
            seq_lens.to(torch.int64), ls.slot_to_page, ls.page_to_slot,
            self._host_index, self._regions.slot_tokens,
            page_size=cfg.page_size, num_sink_pages=cfg.num_sink_pages,
            num_window_pages=cfg.num_window_pages, top_k=cfg.num_selected_pages, layer=layer,
            reduction=cfg.gqa_reduction, scale=scale, head_mask=heads, commit=commit,
            rerank=self._rerank(layer),
        )  # fmt: skip
        k_buf, v_buf = self._regions.buffers(layer)
        try:
            recall_one_layer(self._host_kv, layer, res.work, k_buf, v_buf)
        except RecallError as e:
            # The rows' budget slots hold stale data now: fail those requests, not the batch.
            # Any other error (a broken contract, a CUDA error) propagates: see faults.
            self._fail(sorted(set(rows)), f"FreeKV recall into layer {layer} failed: {e}")
        return res.selected, res.counts
