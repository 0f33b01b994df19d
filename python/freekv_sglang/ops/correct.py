"""Fine-grained correction on the device: the flags, and the decode step's head masks.

Called on the forward stream right after a layer's query of step t exists; the flags (or the
``redo`` plane of `correction_masks`) go to `freekv_sglang.ops.select.select_pages` as
``head_mask`` on the same stream, so the corrective re-selection (and its recall) is predicated
on them without a host synchronisation. `correction_masks` is the decode step's form: it reads
the speculation state of the requests' budget regions itself (one launch instead of the state
gathers, the comparison and the mask logic around `correction_flags`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops._checks import check_tensor
from freekv_sglang.ops._load import extension_for

__all__ = [
    "correction_flags",
    "correction_flags_reference",
    "correction_masks",
    "correction_masks_reference",
]


def correction_flags_reference(
    q: Tensor,
    q_prev: Tensor,
    num_kv_heads: int,
    tau: float | None,
    cos_mean: Tensor | None = None,
    flags: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference of `correction_flags`."""
    b, h_q, _ = q.shape
    x, y = q.float(), q_prev.float()
    eps = 1e-8
    nx = x.norm(dim=-1).clamp_min(eps)
    ny = y.norm(dim=-1).clamp_min(eps)
    cos = (x * y).sum(-1) / (nx * ny)
    c = cos.view(b, num_kv_heads, h_q // num_kv_heads).mean(-1).clamp(-1.0, 1.0)
    f = c < tau if tau is not None else torch.zeros_like(c, dtype=torch.bool)
    if cos_mean is not None:
        cos_mean.copy_(c)
        c = cos_mean
    if flags is not None:
        flags.copy_(f)
        f = flags
    return f, c


def correction_flags(
    q: Tensor,
    q_prev: Tensor,
    num_kv_heads: int,
    tau: float | None,
    cos_mean: Tensor | None = None,
    flags: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``C[b, h]`` = mean over the group of ``cos(q[b, g], q_prev[b, g])``; flag ``C < tau``.

    Args:
        q, q_prev: ``[B, H_q, D]`` queries of steps t and t-1 (same dtype).
        num_kv_heads: ``H`` (divides ``H_q``; query head g belongs to KV head ``g // G``).
        tau: threshold, or ``None`` (correction off: nothing flagged).
        cos_mean, flags: optional outputs ``[B, H]`` float32 / bool (allocated if ``None``).

    Returns:
        ``(flags [B, H] bool, C [B, H] float32)``, as `freekv_sglang.retrieval.correction_flags`.
    """
    ext = extension_for(q, q_prev)
    if ext is None:
        return correction_flags_reference(q, q_prev, num_kv_heads, tau, cos_mean, flags)
    b = q.shape[0]
    if cos_mean is None:
        cos_mean = torch.empty(b, num_kv_heads, dtype=torch.float32, device=q.device)
    if flags is None:
        flags = torch.empty(b, num_kv_heads, dtype=torch.bool, device=q.device)
    ext.correction_flags(
        q,
        q_prev,
        num_kv_heads,
        0.0 if tau is None else float(tau),
        tau is not None,
        cos_mean,
        flags,
    )
    return flags, cos_mean


def correction_masks_reference(
    q: Tensor,
    q_prev: Tensor,
    regs: Tensor,
    seq_lens: Tensor,
    spec_len: Tensor,
    num_kv_heads: int,
    tau: float | None,
    masks: Tensor | None = None,
) -> Tensor:
    """Reference of `correction_masks`."""
    b = q.shape[0]
    have = (spec_len[regs] == seq_lens).unsqueeze(1).expand(b, num_kv_heads)
    flags, _ = correction_flags_reference(q, q_prev[regs], num_kv_heads, tau)
    corrected = flags & have
    out = torch.stack((have, corrected, corrected | ~have))
    if masks is None:
        return out
    masks.copy_(out)
    return masks


def correction_masks(
    q: Tensor,
    q_prev: Tensor,
    regs: Tensor,
    seq_lens: Tensor,
    spec_len: Tensor,
    num_kv_heads: int,
    tau: float | None,
    masks: Tensor | None = None,
) -> Tensor:
    """The correction's head masks of a decode step in one launch, over the speculation state
    of the requests' budget regions (what a decode step needs of `correction_flags`, with the
    state reads and the mask logic around it fused).

    Args:
        q: ``[B, H_q, D]`` this step's queries.
        q_prev: ``[R, H_q, D]`` per budget region, the query that made its speculative
            selection (same dtype as ``q``).
        regs: ``[B]`` int64, each request's region, in ``[0, R)`` (not checked on the device).
        seq_lens: ``[B]`` int64 this step's lengths.
        spec_len: ``[R]`` int64, the length each region's speculative selection was made for
            (0: none).
        num_kv_heads, tau: as for `correction_flags`.
        masks: optional output ``[3, B, H]`` bool (allocated if ``None``).

    Returns:
        ``masks``: ``have_spec`` (``spec_len[regs] == seq_lens``, on every head), ``corrected``
        (``have_spec`` and flagged by the cosine rule) and ``redo`` (``corrected`` or no
        speculation: the heads the correction re-selects; ``masks[2]`` is contiguous, a
        ``head_mask`` for `freekv_sglang.ops.select_pages`).
    """
    b, h_q = q.shape[0], q.shape[1]
    if q.dim() != 3 or q_prev.dim() != 3 or q_prev.shape[1:] != q.shape[1:]:
        raise ValueError(f"q [B, H_q, D] and q_prev [R, H_q, D]: got {q.shape} and {q_prev.shape}")
    if q_prev.dtype != q.dtype:
        raise ValueError(f"q_prev must have dtype {q.dtype}, got {q_prev.dtype}")
    if num_kv_heads < 1 or h_q % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide q.size(1) ({h_q})")
    check_tensor(regs, "regs", torch.int64, (b,), q)
    check_tensor(seq_lens, "seq_lens", torch.int64, (b,), q)
    check_tensor(spec_len, "spec_len", torch.int64, (q_prev.shape[0],), q)
    if masks is not None:
        check_tensor(masks, "masks", torch.bool, (3, b, num_kv_heads), q)
    ext = extension_for(q, q_prev, regs, seq_lens, spec_len)
    if ext is None:
        return correction_masks_reference(
            q, q_prev, regs, seq_lens, spec_len, num_kv_heads, tau, masks
        )
    if masks is None:
        masks = torch.empty(3, q.shape[0], num_kv_heads, dtype=torch.bool, device=q.device)
    ext.correction_masks(
        q, q_prev, regs, seq_lens, spec_len, num_kv_heads,
        0.0 if tau is None else float(tau), tau is not None, masks,
    )  # fmt: skip
    return masks
