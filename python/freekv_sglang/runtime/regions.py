"""Budget regions: the device slots that hold the selected pages of requests over budget.

A region is ``num_selected_pages * page_size`` token slots per layer and KV head (NHD, page
size 1: FlashInfer's layout). All regions are allocated once, at construction, for at most
``count`` requests, so device memory is fixed from start-up and never reallocated under a
running recall. A request takes one at its first decode step over budget
(:meth:`BudgetRegions.take`, from the facade's ``begin_forward``) and gives it back on release
(:meth:`BudgetRegions.give`). A request over budget that finds none free is held dense.

Everything here runs on the scheduler thread; the zeroing of a taken region is queued on the
current stream, after the release that freed it ordered that stream after the recall stream
(so no recall into the region by its last owner can land after the zeroing).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BudgetRegions"]


class BudgetRegions:
    """``count`` budget regions of every layer, and the device map of which row holds which."""

    def __init__(
        self,
        count: int,
        *,
        num_layers: int,
        num_selected_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_requests: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if count < 1:
            raise ValueError(f"max_sparse_requests must be at least 1, got {count}")
        self.count = count
        self.size = num_selected_pages * page_size  # token slots per region
        self._k = num_selected_pages
        self._p = page_size
        self._free = [i * self.size for i in reversed(range(count))]
        shape = (count * self.size, num_kv_heads, head_dim)
        # Uninitialised: a region is zeroed when a request takes it.
        self.k_slots = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_slots = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # First token slot of each of a row's budget slots (-1: the row has no region); the
        # select op writes the recall work list from it.
        self.slot_tokens = torch.full(
            (max_requests, num_selected_pages), -1, dtype=torch.int64, device=device
        )

    @property
    def in_use(self) -> int:
        return self.count - len(self._free)

    def take(self, row: int) -> int:
        """A free region for ``row`` (zeroed in every layer): its first slot, or -1 if none."""
        if not self._free:
            return -1
        base = self._free.pop()
        for t in (*self.k_slots, *self.v_slots):
            t[base : base + self.size].zero_()
        first = torch.arange(self._k) * self._p
        self.slot_tokens[row] = (base + first).to(self.slot_tokens.device, non_blocking=True)
        return base

    def give(self, row: int, base: int) -> None:
        """``row`` leaves the region at ``base`` (``base`` -1: it held none)."""
        self.slot_tokens[row] = -1
        if base >= 0:
            self._free.append(base)

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """Budget-slot keys and values of ``layer``: ``[slots, H, D]`` each."""
        return self.k_slots[layer], self.v_slots[layer]

    def slot_indices(self, bases: list[int]) -> Tensor:
        """Token slots ``[len(bases) * size]`` (int64, CPU) of the regions at ``bases``."""
        base = torch.tensor(bases, dtype=torch.int64)
        return (base.unsqueeze(1) + torch.arange(self.size)).flatten()
