"""Page checksums: a debug check that a cached host page holds the K/V that was offloaded.

A page the prefix cache serves must hold exactly the K/V a dense prefill computed for it. A
failed or skipped conversion, or a page reused under a stale reference, leaves other bytes in
the host pool, and a request that loads it gets wrong text with no error. With
``FREEKV_VERIFY_PAGES=1`` the runtime records :func:`page_checksums` of every page and layer
at offload, from the device tensors the conversion job copies, and recomputes them on the
pages a prefix load-back brings back: a mismatch refuses the load (the request recomputes its
prefix) and is counted, so a test that turns the mode on fails on any path that publishes bad
pages instead of serving wrong text. Off by default: it costs a device-to-host copy of two
integers per page and layer at offload, and one comparison per page and layer at load-back.

The checksum is positional (each element's bit pattern is weighted by its index in the page),
so a swapped pair of tokens or heads is caught as well as a changed value. Both sides compute
it on NHD pages ``[n, page_size, heads, head_dim]`` of the same dtype; equal bits give equal
sums, on any device.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["ENV_VAR", "PageChecksumError", "page_checksums", "verify_pages_from_env"]

ENV_VAR = "FREEKV_VERIFY_PAGES"

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Element weights cycle through 1..65520 (below 2**16). A 4-byte bit pattern times a weight
# stays below 2**47, so the int64 sum of a page is exact up to 2**16 such elements (a page of
# 16 tokens x 8 heads x 128 is 2**14), and for 2-byte dtypes up to 2**32; past that it wraps,
# identically on both sides.
_WEIGHT_PERIOD = 65521


class PageChecksumError(RuntimeError):
    """A host page's K/V differs from what was offloaded into it."""


def verify_pages_from_env() -> bool:
    """Whether ``FREEKV_VERIFY_PAGES`` turns the check on (``1``); unset or ``0``: off."""
    value = os.environ.get(ENV_VAR, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r}: expected 0 or 1")
    return value == "1"


def page_checksums(k: Tensor, v: Tensor) -> Tensor:
    """Per page, a checksum of its K and of its V: ``[n, 2]`` int64 on the pages' device.

    ``k`` and ``v`` are ``[n, page_size, heads, head_dim]`` of one dtype."""
    if k.shape != v.shape or k.dtype != v.dtype or k.dim() != 4:
        raise ValueError(
            f"page_checksums: k and v must be [n, page, heads, dim] of one dtype, got "
            f"{tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}"
        )
    n = k.shape[0]
    bits_dtype = _INT_OF_SIZE[k.element_size()]
    per_page = k[0].numel() if n else 0
    weights = torch.arange(1, per_page + 1, dtype=torch.int64, device=k.device) % _WEIGHT_PERIOD
    out = []
    for t in (k, v):
        bits = t.contiguous().view(bits_dtype).reshape(n, per_page).to(torch.int64)
        out.append((bits * weights).sum(dim=1))
    return torch.stack(out, dim=1)
