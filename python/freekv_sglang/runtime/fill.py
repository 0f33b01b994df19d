"""Pages that fill in a forward: their digests and their offload, in the step or after it.

:class:`FilledPages` holds, for the current forward, each row's logical pages that the forward
fills (found by the facade's ``begin_forward`` from the batch's lengths) and writes them, per
layer, once the engine wrote the layer's K/V: the digests of a sparse layer (the digest op,
into the decode step's store) and one offload job into the host pool
(:class:`~freekv_sglang.runtime.offload.OffloadQueue`). All on the scheduler thread.

By default the adapter calls :meth:`FilledPages.after_kv_write` in each layer's attention, as
the layer's K/V is written. A decode step held in a CUDA graph runs no host code between its
layers, so there the write is *deferred* (:meth:`FilledPages.defer`): it runs for every layer
in the host part of the next forward (:meth:`FilledPages.start`, from ``begin_forward``),
queued on the current stream after the step that wrote the K/V. That is safe because nothing
of the step reads what it writes: a page that fills at step t lies in the window of step t and
of step t + 1 (with a window of two pages or more: the attended window ends at the last token,
and selection candidates end ``num_window_pages`` pages before the last page), so neither the
step's attention, its selection, nor the speculative selection for step t + 1 reads the page's
digest or host copy; the attention reads the page's K/V from the engine's own slots, which
stay allocated while the request runs. The first selection that can choose the page (step
t + 2) waits for its offload job in its host checks. A request released before the next
forward drops its waiting pages (:meth:`FilledPages.drop`): its host pages are freed, and
nothing was published of them (``offloaded`` counts only written pages).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from freekv_sglang.runtime.offload import Span
from freekv_sglang.runtime.reclaim import PoolKV

if TYPE_CHECKING:
    from freekv_sglang.runtime.facade import FreeKVRuntime

__all__ = ["FilledPages"]


class FilledPages:
    """The pages the current forward fills, and their digests and offload (see module doc)."""

    def __init__(self, rt: FreeKVRuntime) -> None:
        self._rt = rt
        self.spans: list[Span] = []  # (row, first page, end page)
        self._where: tuple[Tensor, list[int], Tensor] | None = None  # their slots, ids, idx
        self._source: tuple[PoolKV, Tensor] | None = None  # deferred: where the K/V are
        self._later = False  # this forward's pages are written by the next start()

    @property
    def deferred(self) -> bool:
        """Whether a decode step's write waits for the host part of the next forward."""
        return self._source is not None

    def defer(self, pool_kv: PoolKV, req_to_token: Tensor) -> None:
        """From now on, write a decode step's pages after the step (a prefill's still in its
        forward): ``pool_kv(layer)`` gives the engine's K/V of a layer, ``req_to_token`` its
        token slots per row."""
        self._source = (pool_kv, req_to_token)

    def start(self, decode: bool) -> None:
        """A new forward begins: write what the previous step left (deferred), then forget it;
        ``decode``: whether this forward is a decode step."""
        if self._later and self._source is not None:
            pool_kv, req_to_token = self._source
            for layer in range(self._rt.num_layers):
                k, v = pool_kv(layer)
                self.write(layer, k, v, req_to_token)
        self.spans = []
        self._where = None
        self._later = decode and self._source is not None

    def drop(self, row: int) -> None:
        """``row`` was released: its pages still waiting for a deferred write are not written."""
        if any(r == row for r, _, _ in self.spans):
            self.spans = [s for s in self.spans if s[0] != row]
            self._where = None

    def after_kv_write(
        self, layer: int, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor
    ) -> None:
        """The engine wrote ``layer``'s K/V of this forward: write its filled pages now (unless
        deferred)."""
        if not self._later:
            self.write(layer, k_cache, v_cache, req_to_token)

    def write(self, layer: int, k_cache: Tensor, v_cache: Tensor, req_to_token: Tensor) -> None:
        """Write the digests of ``layer``'s filled pages and offload them."""
        rt = self._rt
        rt.offload.reap(layer)
        if not self.spans:
            return
        if self._where is None:
            p = rt.cfg.page_size
            slots, page_ids = [], []
            for row, first, end in self.spans:
                slots.append(req_to_token[row, first * p : end * p])
                page_ids.extend(rt.row(row).host_pages[first:end])
            tok = torch.cat(slots).to(torch.int64)
            self._where = (tok, page_ids, rt.host_index.indices(page_ids))
        tok, page_ids, pool_idx = self._where  # found once per forward, at its first layer
        k, v = k_cache[tok], v_cache[tok]  # fresh tensors: the engine may reuse the slots
        if not rt.cfg.is_dense_layer(layer):
            rt.decode.write_digests(layer, k, pool_idx)
        rt.inject_conversion_fault([r for r, _, _ in self.spans])
        if rt.checks is not None:
            rt.checks.record(layer, page_ids, k.to(rt.dtype), v.to(rt.dtype))
        rt.offload.submit(layer, k, v, page_ids, self.spans)
        if layer == rt.num_layers - 1:
            for row, _first, end in self.spans:
                rt.row(row).offloaded = end
