"""Per-request rows: what the runtime knows of each request SGLang runs, and where its pages are.

A *row* is SGLang's ``req_pool_idx``. :class:`Row` is the host-side record of the request in a
row (its rid, its host pages, how far they are offloaded, its budget region, its reclaimed
slots); :class:`HostIndex` is the device-side map from (budget region, logical page) to the
page's index in the host pool, which the select op reads to find each candidate page's digest
and to write the recall work list. Only a request holding a region has an entry, so the map
grows with the regions, not with SGLang's rows. Both are written only by the scheduler thread
(the facade's ``begin_forward`` and ``release``); the device map is written on the current
stream, before any selection that reads it is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from freekv_sglang.host_pool import HostKVPool

__all__ = ["HostIndex", "Row"]


@dataclass
class Row:
    """Host-side record of the request in one row."""

    rid: str
    host_pages: list[int] = field(default_factory=list)  # host page id per logical page
    offloaded: int = 0  # logical pages [0, offloaded) are in the host pool (every layer)
    region: int = -1  # its budget region, -1 while it has none
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


class HostIndex:
    """``[regions, pages]`` int64 on the device: the host pool index of each logical page of
    the request holding a region, -1 where it has no host page."""

    def __init__(self, host: HostKVPool, regions: int, max_pages: int, device: torch.device):
        self._pool = host.pool
        self.table = torch.full((regions, max_pages), -1, dtype=torch.int64, device=device)

    def set(self, region: int, first: int, page_ids: list[int]) -> None:
        """The logical pages from ``first`` on of the request in ``region`` are ``page_ids``."""
        if page_ids:
            idx = self.indices(page_ids).to(self.table.device, non_blocking=True)
            self.table[region, first : first + len(page_ids)] = idx

    def indices(self, page_ids: list[int]) -> Tensor:
        """Pool indices of ``page_ids`` (int64, CPU)."""
        return torch.tensor(self._pool.indices_of(page_ids), dtype=torch.int64)

    def clear(self, region: int) -> None:
        self.table[region] = -1
