"""FlashInfer's paged-KV description (``kv_indptr``, ``kv_indices``, ``kv_last_page_len``) of
the pages a decode attends.

The runtime builds these tables from token slots (``freekv_sglang.runtime.tables``) and the
decode kernel sets of ``freekv_sglang.paged_attention`` plan on them.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["PageTable"]


class PageTable(NamedTuple):
    """FlashInfer's paged-KV description: ``kv_indptr [B+1]``, ``kv_indices [capacity]`` (the
    first ``kv_indptr[-1]`` entries are meaningful), ``kv_last_page_len [B]``; all int32.

    ``max_kv_len``, when set, bounds every request's entry count for every table of its kind
    (a value fixed by the geometry, not by this batch): a decode planned on it can give its
    work fixed shapes from step to step (the reference decode does; FlashInfer ignores it)."""

    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_len: Tensor
    max_kv_len: int | None = None
