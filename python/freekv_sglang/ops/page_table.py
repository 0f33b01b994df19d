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
    first ``kv_indptr[-1]`` entries are meaningful), ``kv_last_page_len [B]``; all int32."""

    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_len: Tensor
