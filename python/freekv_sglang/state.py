"""Per-request, per-layer FreeKV state for a ragged batch, and its counters.

`FreeKVState` owns fixed-size tensors indexed by a *row* (the SGLang adapter uses
``req_pool_idx``), one `LayerState` per model layer. A batch names its requests by a ``rows``
int64 tensor; batch order may change from step to step, rows do not.

Lifecycle (all calls from the thread that drives the model; tensors live on ``device`` and are
only touched by work ordered on the caller's current stream, so no lock is needed):

- `FreeKVState.add_request` (request joins; after prefill) resets its row in every layer;
- the retrieval functions read and write rows through `freekv_sglang.attention` (or the
  adapter) once per decode step and layer;
- `FreeKVState.release` (finish, abort, retraction) folds the row's counters into the retired
  totals and resets it, so a reused row never inherits residency or a stale query;
- `FreeKVState.counters` reads the counters back to the host (one sync; for reports, not for
  the decode loop).

Per layer and row the state holds: the digests of full pages; the resident set per KV head
(``slot_to_page`` and its inverse ``page_to_slot``); the speculative selection made at the
previous step and the length it was made for; the previous step's query; and counters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from freekv_sglang.config import FreeKVConfig

__all__ = ["COUNTER_NAMES", "FreeKVState", "LayerState"]

#: Per-row counters. The order lets callers add a block in one update: a decode step's
#: (steps, checks, corrections), and a selection's (selections, resident_hits, pages_recalled,
#: pages_selected), the last three in the order of the select op's ``counts``.
COUNTER_NAMES: tuple[str, ...] = (
    "steps",  # sparse decode steps (request, layer) that attended a subset
    "checks",  # KV-head correction checks (speculative selection existed, context over budget)
    "corrections",  # KV-head checks that fell below tau and were re-selected
    "selections",  # KV-head selections made (speculative, correction, current, initial)
    "resident_hits",  # selected pages already resident
    "pages_recalled",  # pages copied into budget slots (delta misses)
    "pages_selected",  # selected pages handed to the delta (valid entries)
)
_IDX = {n: i for i, n in enumerate(COUNTER_NAMES)}
METRIC_NAMES: tuple[str, ...] = ("mass_sum", "rel_err_sum", "count")


@dataclass
class LayerState:
    """Tensors of one layer (``R`` rows, ``P`` pages, ``S`` slots, ``K`` selected pages).

    Attributes:
        digests: ``[R, P, 2, H, D]`` lo/hi of full pages (keys' dtype). Only entries of pages
            the engine wrote are meaningful (the rest is uninitialised memory); readers must
            mask pages outside `freekv_sglang.retrieval.candidate_mask` before reducing.
        slot_to_page: ``[R, H, S]`` int64, ``-1`` empty.
        page_to_slot: ``[R, H, P]`` int64, ``-1`` not resident.
        spec_pages: ``[R, H, K]`` int64 speculative selection for length ``spec_len``.
        spec_len: ``[R]`` int64, 0 when no speculative selection exists.
        prev_query: ``[R, H_q, D]`` the query that made ``spec_pages``.
        has_prev: ``[R]`` bool.
        counts: ``[R, len(COUNTER_NAMES)]`` int64.
        metrics: ``[R, 3]`` float64 sums of attention-mass recall, relative output error and
            their count (filled only when the decode step is asked to collect them).
    """

    digests: Tensor
    slot_to_page: Tensor
    page_to_slot: Tensor
    spec_pages: Tensor
    spec_len: Tensor
    prev_query: Tensor
    has_prev: Tensor
    counts: Tensor
    metrics: Tensor

    def reset_rows(self, rows: Tensor) -> None:
        # Digests are not cleared: a page's digest is written when the page is (offload or
        # adoption) before any selection can name it as a candidate, and selection masks every
        # non-candidate page before it reduces (see ``digests`` in FreeKVState).
        self.slot_to_page[rows] = -1
        self.page_to_slot[rows] = -1
        self.spec_pages[rows] = -1
        self.spec_len[rows] = 0
        self.prev_query[rows] = 0
        self.has_prev[rows] = False
        self.counts[rows] = 0
        self.metrics[rows] = 0

    def count(self, rows: Tensor, name: str, values: Tensor) -> None:
        """Add ``values [B]`` to counter ``name`` of ``rows`` (host-sync free)."""
        self.counts[:, _IDX[name]].index_add_(0, rows, values.to(torch.int64))

    def count_block(self, rows: Tensor, first: str, values: Tensor) -> None:
        """Add ``values [B, n]`` to the ``n`` counters from ``first`` on (in `COUNTER_NAMES`
        order) of ``rows``: one update instead of ``n`` (host-sync free)."""
        i = _IDX[first]
        n = values.shape[1]
        if i + n > len(COUNTER_NAMES):
            raise ValueError(f"{n} counters from {first!r} run past the last counter")
        self.counts[:, i : i + n].index_add_(0, rows, values.to(torch.int64))


class FreeKVState:
    """State of every layer for up to ``max_requests`` concurrent requests.

    Args:
        cfg: settings.
        num_layers, num_q_heads, num_kv_heads, head_dim: model geometry.
        max_requests: rows (``R``).
        max_seq_len: longest context (sets ``P = ceil(max_seq_len / page_size)``).
        device, dtype: where the tensors live and the keys' dtype (digests, queries).
        with_digests: allocate the per-row digest store (``False``: the caller keeps digests
            elsewhere, e.g. per host page, and ``digests`` is an empty tensor).
    """

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
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        with_digests: bool = True,
    ) -> None:
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        self.cfg = cfg
        self.num_layers = num_layers
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_requests = max_requests
        self.max_pages = -(-max_seq_len // cfg.page_size)
        self.device = torch.device(device)
        self.dtype = dtype
        r, p, h, d = max_requests, self.max_pages, num_kv_heads, head_dim
        k = cfg.num_selected_pages
        dev = self.device
        # Digests are the largest table (R x P pages of every layer) and only the pages of live
        # requests are ever written or read: left uninitialised, the host touches only those
        # (on CPU, memory grows with the pages in use rather than with R x P).
        self.layers: list[LayerState] = [
            LayerState(
                digests=torch.empty(
                    (r, p, 2, h, d) if with_digests else (0,), dtype=dtype, device=dev
                ),
                slot_to_page=torch.full((r, h, k), -1, dtype=torch.int64, device=dev),
                page_to_slot=torch.full((r, h, p), -1, dtype=torch.int64, device=dev),
                spec_pages=torch.full((r, h, k), -1, dtype=torch.int64, device=dev),
                spec_len=torch.zeros(r, dtype=torch.int64, device=dev),
                prev_query=torch.zeros(r, num_q_heads, d, dtype=dtype, device=dev),
                has_prev=torch.zeros(r, dtype=torch.bool, device=dev),
                counts=torch.zeros(r, len(COUNTER_NAMES), dtype=torch.int64, device=dev),
                metrics=torch.zeros(r, len(METRIC_NAMES), dtype=torch.float64, device=dev),
            )
            for _ in range(num_layers)
        ]
        self._retired_counts = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=dev)
        self._retired_metrics = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=dev)

    def tensors(self) -> list[Tensor]:
        """Every tensor the state allocated (for memory accounting)."""
        out = [self._retired_counts, self._retired_metrics]
        for ls in self.layers:
            out.extend(getattr(ls, f.name) for f in fields(ls))
        return out

    def _rows(self, rows: Tensor | list[int] | int) -> Tensor:
        return torch.as_tensor(rows, dtype=torch.int64, device=self.device).reshape(-1)

    def add_request(self, rows: Tensor | list[int] | int) -> None:
        """A request joins at ``rows``: clear its state in every layer."""
        r = self._rows(rows)
        for ls in self.layers:
            ls.reset_rows(r)

    def release(self, rows: Tensor | list[int] | int) -> None:
        """A request leaves: keep its counters in the retired totals, then clear its rows."""
        r = self._rows(rows)
        for ls in self.layers:
            self._retired_counts += ls.counts[r].sum(0)
            self._retired_metrics += ls.metrics[r].sum(0)
            ls.reset_rows(r)

    def bytes_per_page(self) -> int:
        """Bytes recalled per (page, KV head): K and V of ``page_size`` tokens."""
        return 2 * self.cfg.page_size * self.head_dim * torch.empty((), dtype=self.dtype).itemsize

    def counters(self, layers: list[int] | None = None) -> dict[str, float]:
        """Totals over the chosen layers (default all) of live rows plus retired requests
        (retired totals only count when ``layers`` is None). Host sync; for reports.

        Keys: every name of `COUNTER_NAMES`, ``bytes_recalled``, ``correction_rate``
        (corrections / checks), ``page_miss_rate`` (pages_recalled / pages_selected), and the
        mean ``mass_recall`` and ``rel_err`` when metrics were collected.
        """
        idx = range(self.num_layers) if layers is None else layers
        counts = sum(
            (self.layers[i].counts.sum(0) for i in idx), torch.zeros_like(self._retired_counts)
        )
        metrics = sum(
            (self.layers[i].metrics.sum(0) for i in idx), torch.zeros_like(self._retired_metrics)
        )
        if layers is None:
            counts = counts + self._retired_counts
            metrics = metrics + self._retired_metrics
        c = counts.tolist()
        m = metrics.tolist()
        out: dict[str, float] = {n: c[i] for i, n in enumerate(COUNTER_NAMES)}
        out["bytes_recalled"] = out["pages_recalled"] * self.bytes_per_page()
        out["correction_rate"] = out["corrections"] / out["checks"] if out["checks"] else 0.0
        sel = out["pages_selected"]
        out["page_miss_rate"] = out["pages_recalled"] / sel if sel else 0.0
        if m[2]:
            out["mass_recall"] = m[0] / m[2]
            out["rel_err"] = m[1] / m[2]
        return out
