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
  plan writes, per row of the padded batch, whether it is sparse, its lengths, its reclaimed
  pages' dense-store pages, prepares the sparse step for *every* row (a row that is not
  sparse, padding included, is *inert*: it selects in the scratch region, where nothing is
  resident and no page is a candidate, and adds to no counter) and plans the attended tables
  of the batch size;
- :meth:`GraphDecode.forward` (device part, per layer, what the graph records): in a sparse
  layer, FreeKV's step over every row and a whole-context attention for every row (a sparse
  row's over one token), each row taking the one its kind needs; in a dense layer the
  whole-context attention of every row, reading reclaimed pages from the dense-layer store.

The whole-context attention gathers each row's K/V through ``req_to_token`` up to its width
and masks the positions past the row's length (SGLang's own graph-capable backends attend
through a page table padded to the captured maximum likewise). Padding rows attend position 0
of their row and are dropped by the engine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops import PageTable
from freekv_sglang.paged_attention import DecodeKernels, PagedDecode
from freekv_sglang.runtime.facade import FreeKVRuntime
from freekv_sglang.runtime.faults import InvariantError
from freekv_sglang.runtime.tables import attended_table

__all__ = ["GraphDecode"]

_ROW, _SPARSE_LEN, _DENSE_LEN, _IS_SPARSE, _STORE_END = range(5)


class GraphDecode:
    """Decode of padded batches of up to ``max_rows`` rows in fixed shapes (see module doc)."""

    def __init__(
        self, runtime: FreeKVRuntime, kernels: DecodeKernels, max_rows: int, req_to_token: Tensor
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
        dev = req_to_token.device
        self.scratch = runtime.regions.take_scratch()
        runtime.state.add_request(self.scratch)
        runtime.decode.reserve(max_rows)
        self._meta = torch.zeros(5, max_rows, dtype=torch.int64, device=dev)
        self._is_sparse = torch.zeros(max_rows, dtype=torch.bool, device=dev)
        width = req_to_token.shape[1]
        p = cfg.page_size
        self._pos = torch.arange(width, device=dev)
        # Per position past the sink: its page among the reclaimed ones, and its offset.
        past_sink = (self._pos - cfg.sink_tokens).clamp(min=0)
        self._store_page = past_sink // p
        self._store_off = past_sink % p
        self._store_tab = torch.zeros(max_rows, -(-width // p), dtype=torch.int64, device=dev)
        self._paged: dict[int, PagedDecode] = {}  # the attended decode per batch size
        self._b = 0
        self._scale = 0.0
        self._table: PageTable | None = None

    def plan(
        self, rows: list[int], lens: list[int], live: int, req_to_token: Tensor, sm_scale: float
    ) -> None:
        """Host part of a decode step of the padded batch ``rows`` (lengths ``lens``, this
        step's token included), whose first ``live`` rows are requests the runtime adopted."""
        b = len(rows)
        if b > self.max_rows or len(lens) != b or not 0 <= live <= b:
            raise ValueError(f"{b} rows, {len(lens)} lengths, {live} live, {self.max_rows} max")
        rt, cfg = self.rt, self.rt.cfg
        sparse = [i < live and rt.is_sparse(rows[i]) for i in range(b)]
        regions = [
            rt.row(r).region if s else self.scratch for r, s in zip(rows, sparse, strict=True)
        ]
        step_lens = [n if s else 1 for n, s in zip(lens, sparse, strict=True)]
        rt.decode.prepare(rows, regions, step_lens, live=sparse)
        table = attended_table(
            cfg, rows, step_lens, req_to_token, rt.regions.slot_indices(regions),
            rt.regions.size, rt.decode.tables, inert=[not s for s in sparse],
        )  # fmt: skip
        if b not in self._paged:
            self._paged[b] = self.kernels.paged()
        self._paged[b].plan(table, sm_scale, 0.0)
        self._table = table
        dense_lens = [n if i < live else 1 for i, n in enumerate(lens)]
        store_end = [0] * b
        for i in range(live):
            info = rt.row(rows[i])
            if not rt.has_reclaimed(rows[i]) or not cfg.dense_layers:
                continue
            if info.store_rows is None:
                raise InvariantError(f"row {rows[i]}: reclaimed pages outside the dense store")
            store_end[i] = info.reclaimed_end * cfg.page_size
            pages = torch.tensor(info.store_pages, dtype=torch.int64)
            self._store_tab[i, : pages.numel()].copy_(pages, non_blocking=True)
        whole_lens = [1 if s else n for n, s in zip(dense_lens, sparse, strict=True)]
        meta = torch.tensor(
            [rows, whole_lens, dense_lens, [int(s) for s in sparse], store_end], dtype=torch.int64
        )
        self._meta[:, :b].copy_(meta, non_blocking=True)
        self._is_sparse[:b].copy_(torch.tensor(sparse), non_blocking=True)
        self._b, self._scale = b, sm_scale

    def forward(
        self, layer: int, q: Tensor, kv: tuple[Tensor, Tensor], req_to_token: Tensor, scale: float
    ) -> Tensor:
        """Decode attention of ``q [B, H_q, D]`` (the planned batch) in ``layer`` over the
        engine's ``kv`` (this step's K/V written) with the layer's softmax ``scale``;
        ``[B, H_q, D]``. Device work only, once the plan has the model's scale: a capture's
        plan comes before the model's first layer ran, so the warm-up forward that precedes
        every capture re-plans with the scale it finds (host work, before the capture)."""
        b = self._b
        if q.shape[0] != b:
            raise ValueError(f"q has {q.shape[0]} rows, the planned batch {b}")
        if scale != self._scale:
            assert self._table is not None, "forward before plan"
            self._scale = scale
            self._paged[b].plan(self._table, scale, 0.0)
        if self.rt.cfg.is_dense_layer(layer):
            return self._whole(layer, q, kv, req_to_token, _DENSE_LEN)
        whole = self._whole(layer, q, kv, req_to_token, _SPARSE_LEN)
        attended = self._paged[b]
        out = self.rt.sparse_decode(layer, q, self._scale, lambda q_: attended.run(q_, kv))
        return torch.where(self._is_sparse[:b].view(b, 1, 1), out, whole)

    def _whole(
        self, layer: int, q: Tensor, kv: tuple[Tensor, Tensor], req_to_token: Tensor, which: int
    ) -> Tensor:
        """Each row's attention over its first ``meta[which]`` positions (dense layers: the
        reclaimed ones from the dense-layer store)."""
        b = self._b
        meta = self._meta[:, :b]
        idx = req_to_token[meta[_ROW]].to(torch.int64)  # [B, width]
        k, v = kv[0][idx], kv[1][idx]  # [B, width, H, D]
        store = self.rt.reclaim.store_kv(layer)
        if store is not None:
            p = self.rt.cfg.page_size
            lo = self.rt.cfg.sink_tokens
            end = meta[_STORE_END].unsqueeze(1)
            from_store = ((self._pos >= lo) & (self._pos < end)).view(b, -1, 1, 1)
            srow = self._store_tab[:b][:, self._store_page] * p + self._store_off
            k = torch.where(from_store, store[0][srow], k)
            v = torch.where(from_store, store[1][srow], v)
        valid = self._pos < meta[which].unsqueeze(1)  # [B, width]
        # Batched matmuls in float32: each row's result does not depend on the batch's other
        # rows or size (SDPA's CPU kernel's does), so a padded batch equals the unpadded one.
        h_q, h, d = q.shape[1], k.shape[2], q.shape[2]
        qh = q.float().view(b, h, h_q // h, d)
        logits = torch.matmul(qh, k.float().permute(0, 2, 3, 1)) * self._scale  # [B, H, G, W]
        logits = logits.masked_fill(~valid.view(b, 1, 1, -1), float("-inf"))
        out = torch.matmul(torch.softmax(logits, dim=-1), v.float().transpose(1, 2))
        return out.reshape(b, h_q, d).to(q.dtype)
