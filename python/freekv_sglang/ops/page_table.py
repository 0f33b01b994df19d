"""FlashInfer page-table arrays (``kv_indptr``, ``kv_indices``, ``kv_last_page_len``) for the
attended pages of each request, built on the device.

Called on the forward stream before the decode attention is planned. With
``token_level=True`` (SGLang's FlashInfer backend: page size 1, NHD) the indices are token
slots; with ``False`` they are page numbers (``slot // p``) for a page-size-``p`` plan.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.ops._load import extension_for

__all__ = ["PageTable", "build_page_table", "build_page_table_reference"]


class PageTable(NamedTuple):
    """FlashInfer's paged-KV description: ``kv_indptr [B+1]``, ``kv_indices [capacity]`` (the
    first ``kv_indptr[-1]`` entries are meaningful), ``kv_last_page_len [B]``; all int32."""

    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_len: Tensor


def _capacity(page_starts: Tensor, page_size: int, token_level: bool) -> int:
    return page_starts.shape[0] * page_starts.shape[1] * (page_size if token_level else 1)


def build_page_table_reference(
    page_starts: Tensor,
    num_pages: Tensor,
    last_page_len: Tensor,
    page_size: int,
    token_level: bool = True,
    out: PageTable | None = None,
) -> PageTable:
    """Reference of `build_page_table`."""
    b, m = page_starts.shape
    dev = page_starts.device
    n = num_pages.long()
    last = last_page_len.long()
    lens = (n - 1) * page_size + last if token_level else n
    indptr = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    indptr[1:] = torch.cumsum(lens, 0)
    if token_level:
        tok = page_starts.long().unsqueeze(-1) + torch.arange(page_size, device=dev)  # [B, M, p]
        pos = torch.arange(m * page_size, device=dev).view(m, page_size)
        keep = pos.unsqueeze(0) < lens.view(b, 1, 1)
        vals = tok[keep]
        lpl = torch.ones(b, dtype=torch.int64, device=dev)
    else:
        keep = torch.arange(m, device=dev).unsqueeze(0) < n.unsqueeze(1)
        vals = torch.div(page_starts.long(), page_size, rounding_mode="floor")[keep]
        lpl = last
    res = out or PageTable(
        torch.empty(b + 1, dtype=torch.int32, device=dev),
        torch.empty(_capacity(page_starts, page_size, token_level), dtype=torch.int32, device=dev),
        torch.empty(b, dtype=torch.int32, device=dev),
    )
    res.kv_indptr.copy_(indptr)
    res.kv_indices[: vals.numel()] = vals.to(torch.int32)
    res.kv_last_page_len.copy_(lpl)
    return res


def build_page_table(
    page_starts: Tensor,
    num_pages: Tensor,
    last_page_len: Tensor,
    page_size: int,
    token_level: bool = True,
    out: PageTable | None = None,
) -> PageTable:
    """Page table of the attended pages.

    Args:
        page_starts: ``[B, M]`` int32 first token slot of each attended page (sink, selected,
            window, in attention order; entries past ``num_pages[b]`` are ignored).
        num_pages: ``[B]`` int32, ``>= 1``.
        last_page_len: ``[B]`` int32 tokens in each request's last page, ``1..p``.
        page_size: ``p``.
        token_level: token-slot indices (page size 1) or page indices (page size ``p``).
        out: optional preallocated outputs (``kv_indices`` of at least ``B * M`` entries,
            times ``p`` when ``token_level``).
    """
    ext = extension_for(page_starts, num_pages, last_page_len)
    if ext is None:
        return build_page_table_reference(
            page_starts, num_pages, last_page_len, page_size, token_level, out
        )
    b = page_starts.shape[0]
    dev = page_starts.device
    res = out or PageTable(
        torch.empty(b + 1, dtype=torch.int32, device=dev),
        torch.empty(_capacity(page_starts, page_size, token_level), dtype=torch.int32, device=dev),
        torch.empty(b, dtype=torch.int32, device=dev),
    )
    ext.build_page_table(page_starts, num_pages, last_page_len, page_size, token_level, *res)
    return res
