"""Page digests of filled pages straight from SGLang's GPU key buffer, into the digest store.

Called on the forward stream once a page fills (and for every full page after prefill); the
selection that reads the store later runs on the same stream (or waits on an event recorded
after this call), so the digest is ordered before it is read.

Layouts: ``k_buffer [num_slots, H, D]`` (one layer, NHD token slots; a page is ``p``
consecutive slots), ``digests [N, 2, H, D]``: one entry per host pool page (``N`` = the host
pool's capacity in pages), ``[:, 0]`` = lo, ``[:, 1]`` = hi, as in `freekv_sglang.retrieval`.
The selection reads the digest of a request's logical page through its host page
(`freekv_sglang.ops.select.select_pages`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops._load import extension_for

__all__ = ["DIGEST_KINDS", "page_digest", "page_digest_reference"]

DIGEST_KINDS = {"minmax": 0, "mean": 1}


def page_digest_reference(
    k_buffer: Tensor,
    slots: Tensor,
    pages: Tensor,
    digests: Tensor,
    page_size: int,
    kind: str = "minmax",
) -> None:
    """Reference of `page_digest`. It refuses a host page ``>= N`` (``IndexError`` naming it),
    which the kernel, unable to read device values on the host, skips instead."""
    code = DIGEST_KINDS[kind]
    n = digests.shape[0]
    beyond = pages >= n
    if bool(beyond.any()):
        bad = pages[beyond].tolist()
        raise IndexError(
            f"pages must be < N = digests.shape[0] = {n} (host pool pages), got {bad[:8]}"
        )
    keep = pages >= 0
    slots, pages = slots[keep], pages[keep]
    if slots.numel() == 0:
        return
    idx = slots.view(-1, 1) + torch.arange(page_size, device=slots.device)
    keys = k_buffer[idx]  # [n, p, H, D]
    if code == 0:
        dig = torch.stack((keys.amin(dim=1), keys.amax(dim=1)), dim=1)
    else:
        m = (keys.float().sum(dim=1) / page_size).to(keys.dtype)
        dig = torch.stack((m, m), dim=1)
    digests[pages] = dig.to(digests.dtype)


def page_digest(
    k_buffer: Tensor,
    slots: Tensor,
    pages: Tensor,
    digests: Tensor,
    page_size: int,
    kind: str = "minmax",
) -> None:
    """``digests[pages[i]] = digest of k_buffer[slots[i] : slots[i] + page_size]``.

    Args:
        k_buffer: ``[num_slots, H, D]`` one layer's keys (float16 or bfloat16 on CUDA).
        slots: ``[n]`` int64 first token slot of each page in ``k_buffer``.
        pages: ``[n]`` int64 host pool page of each entry; ``< 0`` skips the entry. Indices
            must be ``< N``: the reference raises ``IndexError`` on one ``>= N``; the kernel
            cannot check device values on the host and skips such an entry (it never writes
            outside ``digests``). Two entries must not name one page.
        digests: ``[N, 2, H, D]`` per-host-page store of ``k_buffer``'s dtype, written in place.
        page_size: ``p``.
        kind: ``"minmax"`` (exact) or ``"mean"`` (float32 sum in token order, then divided).
    """
    if kind not in DIGEST_KINDS:
        raise ValueError(f"kind must be one of {tuple(DIGEST_KINDS)}, got {kind!r}")
    ext = extension_for(k_buffer, slots, pages, digests)
    if ext is None:
        page_digest_reference(k_buffer, slots, pages, digests, page_size, kind)
        return
    ext.page_digest(k_buffer, slots, pages, digests, page_size, DIGEST_KINDS[kind])
