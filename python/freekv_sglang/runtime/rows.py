"""Per-request rows: what the runtime knows of each request SGLang runs, and where its pages are.

A *row* is SGLang's ``req_pool_idx``. :class:`Row` is the host-side record of the request in a
row (its rid, its host pages, how far they are offloaded, its budget region, its reclaimed
slots); :class:`HostIndex` is the device-side map from (row, logical page) to the page's index
in the host pool, which the select op reads to write the recall work list. Both are written
only by the scheduler thread (the facade's ``begin_forward``, ``after_kv_write`` and
``release``); the device map is written on the current stream, before any selection that reads
it is queued.
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


class HostIndex:
    """``[rows, pages]`` int64 on the device: the host pool index of each (row, logical page),
    -1 where the row has no host page there."""

    def __init__(self, host: HostKVPool, max_requests: int, max_pages: int, device: torch.device):
        self._pool = host.pool
        self.table = torch.full((max_requests, max_pages), -1, dtype=torch.int64, device=device)

    def set(self, row: int, first: int, page_ids: list[int]) -> None:
        """Row ``row``'s logical pages from ``first`` on are host pages ``page_ids``."""
        if page_ids:
            idx = self.indices(page_ids).to(self.table.device)
            self.table[row, first : first + len(page_ids)] = idx

    def indices(self, page_ids: list[int]) -> Tensor:
        """Pool indices of ``page_ids`` (int64, CPU)."""
        return torch.tensor(self._pool.indices_of(page_ids), dtype=torch.int64)

    def clear(self, row: int) -> None:
        self.table[row] = -1
