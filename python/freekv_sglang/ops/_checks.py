"""Argument checks the op wrappers make before dispatching, so the reference and the compiled
launcher (which checks the same in ``cuda/csrc/checks.h``) refuse the same inputs."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_tensor"]


def check_tensor(
    t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], like: Tensor
) -> None:
    """``t`` on ``like``'s device, contiguous, of ``dtype`` and exactly ``shape``, else a
    ValueError that names it."""
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
