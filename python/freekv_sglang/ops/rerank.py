"""The selection's second stage: the bound's best pages re-ranked by their best logit, read from
a few-bit copy of their keys.

``docs/selection.md`` measures it: each KV head's ``M = R x k`` best pages under the min/max
bound (``k`` the selected pages) are scored again by the largest ``q . k`` over each page's
tokens, per query head, reduced over the GQA group as the bound's scores are, and the top
``k`` of those are selected. The keys are read from a copy of ``bits`` bits per element (2 or
4): each page's keys, per KV head and channel, rounded to ``2 ** bits`` levels between the
channel's min and max over the page, the very range the page's min/max digest stores. This
module states the copy's format and the stage, on any device, in torch:

- `quantize_page_keys` / `dequantize_page_keys`: the codes of a page's keys, packed
  ``8 // bits`` per byte along the head dim (``[n, H, p, D * bits // 8]`` uint8 per page), and
  the keys they stand for; equal, element for element, to `freekv_sglang.attention.quantize_keys`
  (the study's copy);
- `rerank_scores_reference`: the reduced scores of the re-ranked candidates (``-inf``
  elsewhere), the input of the selection's top-k, delta and commit
  (`freekv_sglang.ops.select.select_pages_reference` with ``rerank=``).

The CUDA select kernel runs the same stage in its own launch, between the reduction and the
top-k (``cuda/include/freekv/select.cuh``, Re-ranking); `Rerank.check` refuses what its
launcher refuses. Who calls it: `freekv_sglang.ops.select.select_pages`, on the selection's
stream; nothing here synchronizes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from freekv_sglang.ops._checks import check_tensor

__all__ = [
    "MAX_RERANK_CANDIDATES",
    "RERANK_BITS",
    "Rerank",
    "RerankScores",
    "dequantize_page_keys",
    "quantize_page_keys",
    "rerank_scores_reference",
]

#: Bits per key element the copy may have.
RERANK_BITS = (2, 4)
#: Most pages per KV head one selection re-ranks (the select kernel's shared-memory lists).
MAX_RERANK_CANDIDATES = 512
_NEG = float("-inf")


class RerankScores(NamedTuple):
    """What `rerank_scores_reference` gives (``G`` query heads per KV head).

    Attributes:
        scores: ``[B, H, P]`` float32 reduced scores of the re-ranked candidates, ``-inf``
            elsewhere: the input of the selection's top-k, delta and commit.
        logits: ``[B, H, G, P]`` float32 each candidate's best logit per query head (0
            elsewhere): what the select kernel leaves in its ``raw`` workspace there.
        candidate: ``[B, H, P]`` bool, the re-ranked candidates.
    """

    scores: Tensor
    logits: Tensor
    candidate: Tensor


class Rerank(NamedTuple):
    """The second stage of a selection: ``codes [N, H, p, D * bits // 8]`` uint8, the key copy
    of every host pool page (indexed like the digest store, whose lo/hi are its range), and
    ``candidates``, the bound's best pages re-ranked per KV head (``M = R x k``)."""

    codes: Tensor
    bits: int
    candidates: int

    def check(self, digests: Tensor, page_size: int) -> None:
        """Refuse codes that do not fit the digest store ``[N, 2, H, D]`` (named numbers)."""
        if self.bits not in RERANK_BITS:
            raise ValueError(f"rerank bits must be one of {RERANK_BITS}, got {self.bits}")
        if not 1 <= self.candidates <= MAX_RERANK_CANDIDATES:
            raise ValueError(
                f"need 1 <= rerank candidates <= {MAX_RERANK_CANDIDATES}, got {self.candidates}"
            )
        if digests.shape[-1] % (8 // self.bits):
            raise ValueError(
                f"head dim ({digests.shape[-1]}) must be a multiple of {8 // self.bits} for "
                f"{self.bits}-bit key codes ({8 // self.bits} per byte)"
            )
        n, _, h, d = digests.shape
        check_tensor(
            self.codes, "rerank codes", torch.uint8, (n, h, page_size, d * self.bits // 8), digests
        )


def _step(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    return ((hi.float() - lo.float()) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)


def quantize_page_keys(keys: Tensor, bits: int) -> Tensor:
    """Codes of full pages ``keys [n, p, H, D]``: per page, KV head and channel, the nearest of
    ``2 ** bits`` levels between the channel's min and max over the page (its min/max digest),
    packed ``8 // bits`` per byte along ``D`` (lowest bits first): ``[n, H, p, D * bits // 8]``
    uint8."""
    if bits not in RERANK_BITS:
        raise ValueError(f"bits must be one of {RERANK_BITS}, got {bits}")
    n, p, h, d = keys.shape
    per = 8 // bits
    if d % per:
        raise ValueError(f"head dim {d} is not a multiple of {per} ({bits}-bit codes per byte)")
    kf = keys.float()
    lo, hi = kf.amin(1, keepdim=True), kf.amax(1, keepdim=True)
    codes = torch.round((kf - lo) / _step(lo, hi, bits)).to(torch.int32)  # [n, p, H, D]
    codes = codes.permute(0, 2, 1, 3).reshape(n, h, p, d // per, per)
    shifts = torch.arange(per, device=keys.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(-1).to(torch.uint8)


def dequantize_page_keys(codes: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """The keys ``codes [..., p, D * bits // 8]`` stand for, with the pages' range ``lo``/``hi``
    ``[..., D]`` (their digest): ``[..., p, D]`` float32."""
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    c = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    c = c.flatten(-2).float()  # [..., p, D]
    lo_f = lo.float().unsqueeze(-2)
    return lo_f + c * _step(lo, hi, bits).unsqueeze(-2)


def rerank_scores_reference(
    q: Tensor,
    reduced: Tensor,
    digests: Tensor,
    host_pages: Tensor,
    rerank: Rerank,
    reduction: str,
    scale: float,
) -> RerankScores:
    """The second stage: each KV head's ``rerank.candidates`` best pages under ``reduced``
    (``[B, H, P]``, the bound's reduced scores, ``-inf`` where not selectable; equal scores
    lowest page first; only pages above ``-inf``) scored by their best logit over the page's
    tokens per query head of ``q [B, H_q, D]``, from the key copy of their host pages
    ``host_pages [B, P]``, and reduced over the group (``reduction``, softmax temperature
    ``scale``). Candidates are full pages (they end before the window)."""
    b, h_q, d = q.shape
    h, n_p = reduced.shape[1], reduced.shape[2]
    g = h_q // h
    if digests.shape[0] == 0:  # no host page: no page is selectable, none is re-ranked
        none = torch.zeros_like(reduced, dtype=torch.bool)
        return RerankScores(torch.full_like(reduced, _NEG), reduced.new_zeros(b, h, g, n_p), none)
    m = min(rerank.candidates, n_p)
    vals, idx = torch.sort(reduced, dim=-1, descending=True, stable=True)
    cidx, ok = idx[..., :m], ~torch.isneginf(vals[..., :m])  # [B, H, M]
    hp = host_pages.gather(-1, cidx.reshape(b, h * m)).view(b, h, m)
    hp = torch.where(ok, hp, 0)
    heads = torch.arange(h, device=q.device).view(1, h, 1)
    codes = rerank.codes[hp, heads]  # [B, H, M, p, D * bits / 8]
    keys = dequantize_page_keys(codes, digests[hp, 0, heads], digests[hp, 1, heads], rerank.bits)
    best = torch.einsum("bhgd,bhmpd->bhgmp", q.float().view(b, h, g, d), keys).amax(-1)
    keep = ok.unsqueeze(2)  # [B, H, 1, M]
    if reduction == "softmax_mean":
        probs = torch.softmax(torch.where(keep, best * scale, _NEG), dim=-1)
        red = torch.nan_to_num(probs, nan=0.0).mean(dim=2)
    elif reduction == "mean":
        red = torch.where(keep, best, _NEG).mean(dim=2)
    elif reduction == "max":
        red = torch.where(keep, best, _NEG).amax(dim=2)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    red = torch.where(ok & ~torch.isnan(red), red, _NEG)
    scores = torch.full_like(reduced, _NEG).scatter(-1, cidx, red)
    logits = reduced.new_zeros(b, h, g, n_p)
    logits.scatter_(-1, cidx.unsqueeze(2).expand(b, h, g, m), torch.where(keep, best, 0.0))
    candidate = torch.zeros_like(reduced, dtype=torch.bool).scatter(-1, cidx, ok)
    return RerankScores(scores, logits, candidate)
