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
    """``count`` budget regions of every layer; region ``i`` is token slots
    ``[i * size, (i + 1) * size)`` of each layer's slot buffers."""

    def __init__(
        self,
        count: int,
        *,
        num_layers: int,
        num_selected_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if count < 1:
            raise ValueError(f"max_sparse_requests must be at least 1, got {count}")
        self.count = count
        self.size = num_selected_pages * page_size  # token slots per region
        self._free = list(reversed(range(count)))
        self.scratch = -1  # the region of padded batches' inert rows (take_scratch)
        shape = (count * self.size, num_kv_heads, head_dim)
        # Uninitialised: a region is zeroed when a request takes it.
        self.k_slots = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_slots = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # First token slot of each budget slot of each region (fixed); the select op writes the
        # recall work list from it.
        first = torch.arange(count * num_selected_pages, dtype=torch.int64) * page_size
        self.slot_tokens = first.view(count, num_selected_pages).to(device)

    @property
    def in_use(self) -> int:
        """Regions requests hold (the scratch region is not one)."""
        return self.count - len(self._free) - (self.scratch >= 0)

    def take_scratch(self) -> int:
        """Set one region aside, for good, for the inert rows of padded batches (a CUDA graph's
        batch: they select nothing, and their results are dropped); at least one region
        must stay for requests. Returns it (the same one on every call)."""
        if self.scratch < 0:
            if len(self._free) < 2:
                raise ValueError(
                    f"a scratch region for padded batches needs 2 free budget regions, "
                    f"{len(self._free)} are"
                )
            self.scratch = self.take()
        return self.scratch

    def take(self) -> int:
        """A free region (zeroed in every layer), or -1 if none is free."""
        if not self._free:
            return -1
        region = self._free.pop()
        base = region * self.size
        for t in (*self.k_slots, *self.v_slots):
            t[base : base + self.size].zero_()
        return region

    def give(self, region: int) -> None:
        self._free.append(region)

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """Budget-slot keys and values of ``layer``: ``[slots, H, D]`` each."""
        return self.k_slots[layer], self.v_slots[layer]

    def slot_indices(self, regions: list[int]) -> Tensor:
        """Token slots ``[len(regions) * size]`` (int64, CPU) of ``regions``, in order."""
        base = torch.tensor(regions, dtype=torch.int64) * self.size
        return (base.unsqueeze(1) + torch.arange(self.size)).flatten()

    def tensors(self) -> list[Tensor]:
        return [*self.k_slots, *self.v_slots, self.slot_tokens]
