"""Budget regions: the device slots that hold the selected pages of requests over budget.

A region is ``num_selected_pages * page_size`` token slots per layer and KV head (NHD, page
size 1: FlashInfer's layout). The regions are rows of the engine's own K and V buffers, past
the slots its allocator hands out (the SGLang adapter builds SGLang's KV pool with that many
extra rows: :mod:`freekv_sglang.sglang.memory`), so one page table lists a sparse request's
sink and window slots and its budget slots alike and one paged decode attends them all. The
rows are fixed from start-up and never reallocated under a running recall. A request takes a
region at its first decode step over budget (:meth:`BudgetRegions.take`, from the facade's
``begin_forward``) and gives it back on release (:meth:`BudgetRegions.give`). A request over
budget that finds none free is held dense.

Everything here runs on the scheduler thread; the zeroing of a taken region is queued on the
current stream, after the release that freed it ordered that stream after the recall stream
(so no recall into the region by its last owner can land after the zeroing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BudgetRegions"]


class BudgetRegions:
    """``count`` budget regions in the engine's per-layer K and V buffers ``[N, H, D]``:
    region ``i`` is token slots ``[first + i * size, first + (i + 1) * size)`` of each."""

    def __init__(
        self,
        count: int,
        *,
        num_selected_pages: int,
        page_size: int,
        k_buffers: Sequence[Tensor],
        v_buffers: Sequence[Tensor],
        first_slot: int,
    ) -> None:
        if count < 1:
            raise ValueError(f"max_sparse_requests must be at least 1, got {count}")
        self.count = count
        self.size = num_selected_pages * page_size  # token slots per region
        self.first = first_slot
        end = first_slot + count * self.size
        if not k_buffers or len(k_buffers) != len(v_buffers):
            raise ValueError(
                f"one K and one V buffer per layer, got {len(k_buffers)} and {len(v_buffers)}"
            )
        for name, bufs in (("k_buffers", k_buffers), ("v_buffers", v_buffers)):
            for layer, t in enumerate(bufs):
                if t.dim() != 3 or t.shape != k_buffers[0].shape or t.dtype != k_buffers[0].dtype:
                    raise ValueError(
                        f"{name}[{layer}] must be [slots, H, D] like k_buffers[0] "
                        f"{tuple(k_buffers[0].shape)} {k_buffers[0].dtype}, got "
                        f"{tuple(t.shape)} {t.dtype}"
                    )
        if first_slot < 0 or end > k_buffers[0].shape[0]:
            raise ValueError(
                f"{count} budget regions of {self.size} slots from slot {first_slot} need "
                f"{end} rows in the KV buffers, which have {k_buffers[0].shape[0]}"
            )
        self._free = list(reversed(range(count)))
        self.scratch = -1  # the region of padded batches' inert rows (take_scratch)
        self.k_slots = list(k_buffers)
        self.v_slots = list(v_buffers)
        # First token slot of each budget slot of each region (fixed); the select op writes the
        # recall work list from it.
        first = first_slot + torch.arange(count * num_selected_pages, dtype=torch.int64) * page_size
        self.slot_tokens = first.view(count, num_selected_pages).to(k_buffers[0].device)

    @staticmethod
    def tokens(count: int, num_selected_pages: int, page_size: int) -> int:
        """Rows of the KV buffers ``count`` regions take."""
        return count * num_selected_pages * page_size

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
        base = self.first + region * self.size
        for t in (*self.k_slots, *self.v_slots):
            t[base : base + self.size].zero_()
        return region

    def give(self, region: int) -> None:
        self._free.append(region)

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """The K and V buffers of ``layer`` the regions are rows of: ``[slots, H, D]`` each."""
        return self.k_slots[layer], self.v_slots[layer]

    def slot_indices(self, regions: list[int]) -> Tensor:
        """Token slots ``[len(regions) * size]`` (int64, CPU) of ``regions``, in order."""
        base = self.first + torch.tensor(regions, dtype=torch.int64) * self.size
        return (base.unsqueeze(1) + torch.arange(self.size)).flatten()

    def tensors(self) -> list[Tensor]:
        """The regions' rows of every layer's K and V buffers (views: the buffers are the
        engine's, these rows FreeKV's) and the slot map."""
        rows = slice(self.first, self.first + self.count * self.size)
        return [*(t[rows] for t in (*self.k_slots, *self.v_slots)), self.slot_tokens]
