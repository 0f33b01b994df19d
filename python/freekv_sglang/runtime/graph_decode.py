"""FreeKV's decode of a padded batch in fixed shapes: the form a CUDA graph of the engine holds.

An engine that decodes under CUDA graphs (SGLang's graph runner) captures the forward of a
batch of ``B`` rows once per captured size and then replays it for any batch of at most ``B``
requests: the requests first, then padding rows (SGLang pads with row 0 and a fill length).
The same graph serves every mix of requests over budget and within it, so the decode cannot
branch on the batch: :class:`GraphDecode` runs one fixed sequence of device ops per batch size
over buffers allocated once, and all that varies is written into them by its host part.

- :meth:`GraphDecode.plan` (host part, outside the graph: before each capture and each replay,
  and for eager batches): the runtime adopted the batch's requests (``begin_forward``, which
  also offloads the pages the previous step filled: :mod:`~freekv_sglang.runtime.fill`); the
  plan writes, per row of the padded batch, whether it is sparse and whether its reclaimed
  pages sit in the dense-layer store, prepares the sparse step for *every* row (a row that is
  not sparse, padding included, is *inert*: it selects in the scratch region, where nothing is
  resident and no page is a candidate, and adds to no counter), and plans the batch size's
  paged decodes, each over a token-level table copied into buffers of its own (the kernel
  set's fixed form, :class:`~freekv_sglang.paged_attention.FixedTable`):

  * ``step``: a sparse row's sink + window slots and budget slots (FreeKV's attention), any
    other row's whole context in SGLang's pool (a padding row's first token): the attention
    FreeKV's step runs for every row of a sparse layer, so its output is each row's own;
  * ``pool`` and ``store`` (models with dense layers): a dense layer's attention of every
    row in two parts, its slots still in SGLang's pool (sink, then from the end of its
    reclaimed pages) and its reclaimed pages in the dense-layer store (a row without any
    attends the store's first row, and its merge is not used), merged by their LSEs.

- :meth:`GraphDecode.forward` (device part, per layer, what the graph records): in a sparse
  layer FreeKV's step over every row, attending ``step``; in a dense layer ``pool`` (and
  ``store`` with the merge).

Tables are bounded so their buffers fit any batch: a row's entries by SGLang's context width,
a table's entries by the pool's slots (or the store's rows) plus one per row, since live rows
hold disjoint slots. Batches of more rows than the graphs capture (eager batches in graph
mode) use one decode per table kind in the kernel set's plain form, on the same tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops import PageTable
from freekv_sglang.paged_attention import DecodeKernels, FixedTable, PagedDecode
from freekv_sglang.runtime.facade import FreeKVRuntime
from freekv_sglang.runtime.faults import InvariantError
from freekv_sglang.runtime.tables import attended_table, pick_rows, token_table

__all__ = ["GraphDecode"]


class GraphDecode:
    """Decode of padded batches of up to ``max_rows`` rows in fixed shapes (see module doc);
    batches of at most ``fixed_rows`` rows (default: all) get the kernels' fixed form."""

    def __init__(
        self,
        runtime: FreeKVRuntime,
        kernels: DecodeKernels,
        max_rows: int,
        req_to_token: Tensor,
        fixed_rows: int | None = None,
    ) -> None:
        cfg = runtime.cfg
        if cfg.num_window_pages < 2:
            raise ValueError(
                "a decode step in a CUDA graph needs a window of at least two pages (with one, "
                "a page that fills can be selected at the next step before its offload is "
                f"known done); the window is {cfg.window_tokens} tokens of pages of "
                f"{cfg.page_size}"
            )
        self.rt = runtime
        self.kernels = kernels
        self.max_rows = max_rows
        self.fixed_rows = max_rows if fixed_rows is None else min(fixed_rows, max_rows)
        dev = req_to_token.device
        self.scratch = runtime.regions.take_scratch()
        runtime.state.add_request(self.scratch)
        runtime.decode.reserve(max_rows)
        self._has_store = torch.zeros(max_rows, dtype=torch.bool, device=dev)
        self._width = req_to_token.shape[1]  # a row's context bound
        store = runtime.reclaim.store_kv(min(cfg.dense_layers)) if cfg.dense_layers else None
        self._store_rows = 0 if store is None else store[0].shape[0]
        # Entry bounds of each kind's tables: live rows hold disjoint slots of the pool (the
        # regions' rows are past them) and disjoint pages of the store; one entry per other row.
        fr = self.fixed_rows
        attended = cfg.sink_tokens + cfg.num_window_pages * cfg.page_size + runtime.regions.size
        self._entries = {
            "step": fr * attended + runtime.regions.first,
            "pool": runtime.regions.first + fr,
            "store": self._store_rows + fr,
        }
        self._decodes: dict[int, dict[str, PagedDecode]] = {}  # per batch size (fixed form)
        self._plain: dict[str, PagedDecode] = {}  # batches over fixed_rows
        self._tables: dict[str, PageTable] = {}
        self._planned: dict[str, PagedDecode] = {}  # the decodes of the planned batch size
        self._no_store = torch.zeros(1, dtype=torch.int64, device=dev)  # a row without any
        self._b = 0
        self._scale = 0.0
        self._logit_cap = 0.0
        self._last_layer = runtime.num_layers - 1

    @property
    def dense_parts(self) -> tuple[str, ...]:
        """The table kinds a dense layer attends: ``pool`` (and ``store`` with a store)."""
        if not self.rt.cfg.dense_layers:
            return ()
        return ("pool", "store") if self._store_rows else ("pool",)

    def buffers(self) -> dict[str, Tensor]:
        """Every device tensor its forward reads besides the engine's and the runtime's (named;
        the same from plan to plan for the batch sizes in fixed form)."""
        named = {"has_store": self._has_store}
        for b, decodes in self._decodes.items():
            for kind, paged in decodes.items():
                for i, t in enumerate(paged.buffers()):
                    named[f"{kind}.{b}.{i}"] = t
        return named

    def _kinds(self) -> tuple[str, ...]:
        return ("step", *self.dense_parts)

    def _decodes_of(self, b: int) -> dict[str, PagedDecode]:
        if b > self.fixed_rows:
            if not self._plain:
                self._plain = {kind: self.kernels.paged() for kind in self._kinds()}
            return self._plain
        got = self._decodes.get(b)
        if got is None:
            got = self._decodes[b] = {
                kind: self.kernels.paged(FixedTable(b, self._entries[kind], kind))
                for kind in self._kinds()
            }
        return got

    def plan(
        self,
        rows: list[int],
        lens: list[int],
        live: int,
        req_to_token: Tensor,
        sm_scale: float,
        logit_cap: float = 0.0,
    ) -> None:
        """Host part of a decode step of the padded batch ``rows`` (lengths ``lens``, this
        step's token included), whose first ``live`` rows are requests the runtime adopted;
        the attention's softmax scale and logit soft cap (0: none)."""
        b = len(rows)
        if b > self.max_rows or len(lens) != b or not 0 <= live <= b:
            raise ValueError(f"{b} rows, {len(lens)} lengths, {live} live, {self.max_rows} max")
        if any(not 1 <= n <= self._width for n in lens):
            raise ValueError(f"lengths {lens} outside [1, {self._width}]")
        rt, cfg = self.rt, self.rt.cfg
        sparse = [i < live and rt.is_sparse(rows[i]) for i in range(b)]
        regions = [
            rt.row(r).region if s else self.scratch for r, s in zip(rows, sparse, strict=True)
        ]
        step_lens = [n if s else 1 for n, s in zip(lens, sparse, strict=True)]
        rt.decode.prepare(rows, regions, step_lens, live=sparse)
        attended = attended_table(
            cfg, rows, step_lens, req_to_token, rt.regions.slot_indices(regions),
            rt.regions.size, rt.decode.tables, inert=[not s for s in sparse],
        )  # fmt: skip
        whole = token_table(
            rows, [[(0, 0 if s else n)] for n, s in zip(lens, sparse, strict=True)], req_to_token
        )
        tables = {"step": pick_rows(sparse, attended, whole, self._width)}
        dense_lens = [n if i < live else 1 for i, n in enumerate(lens)]
        has_store = [False] * b
        if self.dense_parts:
            spans: list[list[tuple[int, int]]] = []
            stored: list[Tensor] = []
            for i, (r, n) in enumerate(zip(rows, dense_lens, strict=True)):
                info = rt.row(r) if i < live else None
                if info is None or not rt.has_reclaimed(r):
                    spans.append([(0, n)])
                    continue
                if info.store_rows is None:
                    raise InvariantError(f"row {r}: reclaimed pages outside the dense store")
                end = info.reclaimed_end * cfg.page_size
                spans.append([(0, cfg.sink_tokens), (end, n)])
                stored.append(info.store_rows[: end - cfg.sink_tokens])
                has_store[i] = True
            tables["pool"] = self._bounded(token_table(rows, spans, req_to_token))
            if self._store_rows:
                tables["store"] = self._store_table(has_store, stored)
        decodes = self._decodes_of(b)
        for kind, table in tables.items():
            decodes[kind].plan(table, sm_scale, logit_cap)
        self._has_store[:b].copy_(torch.tensor(has_store), non_blocking=True)
        self._tables, self._planned = tables, decodes
        self._b, self._scale, self._logit_cap = b, sm_scale, logit_cap

    def _bounded(self, table: PageTable) -> PageTable:
        return table._replace(max_kv_len=self._width)

    def _store_table(self, has_store: list[bool], stored: list[Tensor]) -> PageTable:
        """The dense-layer store's rows of each row's reclaimed pages (one row, the store's
        first, for a row without any), bounded like the pool's tables."""
        parts = iter(stored)
        lens: list[int] = []
        pieces: list[Tensor] = []
        for s in has_store:
            piece = next(parts) if s else self._no_store
            pieces.append(piece)
            lens.append(piece.shape[0])
        indptr = torch.zeros(len(has_store) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0)
        indices = torch.cat(pieces).to(torch.int32)
        ones = torch.ones(len(has_store), dtype=torch.int32)
        return PageTable(indptr, indices, ones, self._width)

    def forward(
        self,
        layer: int,
        q: Tensor,
        kv: tuple[Tensor, Tensor],
        scale: float,
        logit_cap: float = 0.0,
    ) -> Tensor:
        """Decode attention of ``q [B, H_q, D]`` (the planned batch) in ``layer`` over the
        engine's ``kv`` (this step's K/V written) with the layer's softmax ``scale`` and logit
        soft cap; ``[B, H_q, D]``. Device work only, once the plan has the model's values: a
        capture's plan comes before the model's first layer ran, so the warm-up forward that
        precedes every capture re-plans with the values it finds (host work, before the
        capture). The model's last layer ends the step (:meth:`SparseDecode.end_step`: a
        graph's forward ends with the recall stream joined)."""
        b = self._b
        if q.shape[0] != b:
            raise ValueError(f"q has {q.shape[0]} rows, the planned batch {b}")
        decodes = self._planned
        if (scale, logit_cap) != (self._scale, self._logit_cap):
            if not self._tables:
                raise RuntimeError("forward before plan")
            self._scale, self._logit_cap = scale, logit_cap
            for kind, table in self._tables.items():
                decodes[kind].plan(table, scale, logit_cap)
        if self.rt.cfg.is_dense_layer(layer):
            out = self._dense(layer, q, kv, decodes)
        else:
            step = decodes["step"]
            out = self.rt.sparse_decode(layer, q, self._scale, lambda q_: step.run(q_, kv))
        if layer == self._last_layer:
            self.rt.decode.end_step()
        return out

    def _dense(
        self, layer: int, q: Tensor, kv: tuple[Tensor, Tensor], decodes: dict[str, PagedDecode]
    ) -> Tensor:
        """A dense layer: each row over its pool slots, merged with its reclaimed pages'
        attention over the dense-layer store where it has some."""
        store = self.rt.reclaim.store_kv(layer)
        if store is None or "store" not in decodes:
            return decodes["pool"].run(q, kv)
        b = self._b
        o_pool, lse_pool = decodes["pool"].run_with_lse(q, kv)
        o_store, lse_store = decodes["store"].run_with_lse(q, store)
        merged = self.kernels.merge(o_pool, lse_pool, o_store, lse_store)
        return torch.where(self._has_store[:b].view(b, 1, 1), merged, o_pool)
