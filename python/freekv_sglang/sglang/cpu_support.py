"""Serving on a host without CUDA: the rotary kernel SGLang expects, and gloo tensor parallelism.

Why this exists. SGLang 0.5.23 serves on CPU with ``--device cpu`` and the ``torch_native``
attention backend, except for one gap: on a host where ``torch.cuda.is_available()`` is false
and ``SGLANG_USE_CPU_ENGINE`` is unset, ``RotaryEmbedding.__init__``
(``sglang/srt/layers/rotary_embedding/base.py``) takes the branch that imports the compiled
``vllm._custom_ops.rotary_embedding`` as its fallback kernel. vLLM is not a dependency, so model
construction fails with ``ModuleNotFoundError`` although the forward pass on that host never calls
the kernel: dispatch picks ``forward_native`` (``sglang.kernels.fused_op._platform_key`` is empty
there).

What the hook does. :func:`rotary_init_around` is an AROUND hook on ``RotaryEmbedding.__init__``,
a row of :data:`freekv_sglang.sglang.lifecycle.HOOKS` that the plugin registers (in the launcher
and in every scheduler subprocess, before any model is built) only where
:func:`needs_rotary_fallback` holds. Only while the original ``__init__`` runs, the base module's
``_is_cpu`` flag reads true, which selects the branch that needs no compiled kernel; the instance
then gets :func:`rotary_embedding` below as its ``fallback_rotary_embedding``, a pure-torch
kernel with the signature of the compiled one. Model construction is single-threaded, so the
temporary flag is seen by no other code. On a CUDA host, or when vLLM is importable, the hook
calls the original unchanged.

Tensor parallelism without CUDA. SGLang 0.5.23 runs ``--tp N --device cpu`` over gloo process
groups, except that ``init_model_parallel_group`` (``sglang/srt/distributed/parallel_state.py``)
decides ``use_pynccl`` from the platform alone and so asks for a NCCL communicator for a gloo
group, which fails on a host without CUDA (``torch.cuda.device('cpu')``). :func:`tp_group_around`
is an AROUND hook on that function, attached on hosts without CUDA only (the same table, row
condition :attr:`~freekv_sglang.sglang.hooks.When.NO_CUDA`): when the caller leaves
``use_pynccl`` unset and the group's backend is ``gloo``, it passes ``use_pynccl=False``; every
other argument, and every call on a CUDA host, is unchanged. SGLang's own collectives then run
over gloo, on the scheduler thread of each rank, as they do on any non-NCCL platform.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate ``query`` and ``key`` in place: the compiled ``rotary_embedding`` kernel in torch.

    Args:
        positions: ``[num_tokens]`` (or any shape with ``num_tokens`` elements) int positions.
        query: ``[num_tokens, num_heads * head_size]`` or ``[num_tokens, num_heads, head_size]``.
        key: like ``query`` with the KV head count, or ``None``.
        head_size: size of one head; the first ``rotary_dim = cos_sin_cache.shape[-1]`` channels
            of each head rotate, the rest pass through.
        cos_sin_cache: ``[max_position, rotary_dim]``, cosines then sines (``rotary_dim // 2``
            each), as SGLang's ``RotaryEmbedding._compute_cos_sin_cache`` builds it.
        is_neox: rotate halves (GPT-NeoX style) when true, interleaved pairs (GPT-J style) when
            false.

    The rotation is computed in the cache's precision promoted with the input's, then written
    back in the input's dtype, as SGLang's ``forward_native`` does.
    """
    flat_positions = positions.reshape(-1)
    cos_sin = cos_sin_cache.index_select(0, flat_positions)
    cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, rotary_dim // 2] each
    for tensor in (query, key):
        if tensor is None:
            continue
        heads = tensor.view(flat_positions.shape[0], -1, head_size)
        rotary_dim = cos_sin_cache.shape[-1]
        rot = heads[..., :rotary_dim]
        rot.copy_(_rotate(rot, cos, sin, is_neox))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """``x``: ``[tokens, heads, rotary_dim]``; ``cos``/``sin``: ``[tokens, rotary_dim // 2]``."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def needs_rotary_fallback() -> bool:
    """True on a host where SGLang's rotary layer would import a compiled kernel it lacks."""
    return not torch.cuda.is_available() and importlib.util.find_spec("vllm") is None


def rotary_init_around(original: Callable[..., None], self: Any, *args: Any, **kwargs: Any) -> None:
    """AROUND hook on ``RotaryEmbedding.__init__`` (see the module docstring)."""
    if not needs_rotary_fallback():
        original(self, *args, **kwargs)
        return
    # Imported on call: loading this module (at plugin load, in every process) leaves SGLang's
    # rotary layer unloaded on hosts that do not need the fallback.
    from sglang.srt.layers.rotary_embedding import base

    saved = base._is_cpu
    base._is_cpu = True
    try:
        original(self, *args, **kwargs)
    finally:
        base._is_cpu = saved
    self.use_fallback_kernel = True
    self.fallback_rotary_embedding = rotary_embedding


def needs_gloo_tp_groups() -> bool:
    """True on a host without CUDA, where a gloo group must not ask for a NCCL communicator."""
    return not torch.cuda.is_available()


#: Position of ``backend`` and ``use_pynccl`` in ``init_model_parallel_group``'s signature
#: (SGLang 0.5.23: ``group_ranks, local_rank, backend, use_pynccl, ...``).
_BACKEND_POS = 2
_USE_PYNCCL_POS = 3


def tp_group_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on ``init_model_parallel_group`` (see the module docstring)."""
    backend = kwargs.get("backend", args[_BACKEND_POS] if len(args) > _BACKEND_POS else None)
    use_pynccl = kwargs.get(
        "use_pynccl", args[_USE_PYNCCL_POS] if len(args) > _USE_PYNCCL_POS else None
    )
    if backend == "gloo" and use_pynccl is None and needs_gloo_tp_groups():
        if len(args) > _USE_PYNCCL_POS:
            args = (*args[:_USE_PYNCCL_POS], False, *args[_USE_PYNCCL_POS + 1 :])
        else:
            kwargs["use_pynccl"] = False
    return original(*args, **kwargs)
