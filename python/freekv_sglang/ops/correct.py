"""Fine-grained correction flags on the device.

Called on the forward stream right after a layer's query of step t exists; the flags go to
`freekv_sglang.ops.select.select_pages` as ``head_mask`` on the same stream, so the corrective
re-selection (and its recall) is predicated on them without a host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops._load import extension_for

__all__ = ["correction_flags", "correction_flags_reference"]


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
