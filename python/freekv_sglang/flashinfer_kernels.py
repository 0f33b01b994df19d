"""FlashInfer's kernels as the :class:`~freekv_sglang.paged_attention.DecodeKernels` of FreeKV's
page-table decode (:mod:`freekv_sglang.runtime.paged_decode`).

Built by the FlashInfer backend (:mod:`freekv_sglang.sglang.flashinfer_backend`) on SGLang's
float workspace; every call comes from the scheduler thread and queues on the current stream.
Plans share the workspace because their runs never overlap: they run one after another on the
forward stream, as SGLang's own wrappers do. Imports neither SGLang nor the Rust extension, so
``benchmarks/gpu_check.py`` checks this very code on a bare GPU host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops.page_table import PageTable
from freekv_sglang.paged_attention import PagedDecode

__all__ = ["FlashInferDecodeKernels"]


class _FlashInferPagedDecode:
    """A ``BatchDecodeWithPagedKVCacheWrapper`` on SGLang's float workspace (NHD)."""

    def __init__(self, kernels: FlashInferDecodeKernels) -> None:
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        self._k = kernels
        self._wrapper = BatchDecodeWithPagedKVCacheWrapper(
            kernels.workspace, "NHD", use_tensor_cores=kernels.use_tensor_cores
        )

    def plan(self, table: PageTable, sm_scale: float, logit_cap: float) -> None:
        k = self._k
        n = int(table.kv_indptr[-1])  # kv_indptr is on the host: no sync
        self._wrapper.plan(
            table.kv_indptr,
            table.kv_indices[:n],
            table.kv_last_page_len,
            k.num_qo_heads,
            k.num_kv_heads,
            k.head_dim,
            1,
            q_data_type=k.q_dtype,
            kv_data_type=k.kv_dtype,
            sm_scale=sm_scale,
            logits_soft_cap=logit_cap or None,
            non_blocking=True,
        )

    def run(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        return self._wrapper.run(q, kv)


class FlashInferDecodeKernels:
    """:class:`~freekv_sglang.paged_attention.DecodeKernels` by FlashInfer: batch decode
    wrappers and ``single_decode_with_kv_cache``.

    ``use_tensor_cores`` is SGLang's decode choice, used by the batch wrappers and the single
    decode alike: FlashInfer's CUDA-core decode has kernels for GQA group sizes 1, 2, 3, 4, 6,
    8 and 16 only, so models with other groups (5, 7, ...) need the tensor-core path."""

    def __init__(
        self,
        workspace: Tensor,
        *,
        use_tensor_cores: bool,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
    ) -> None:
        self.workspace = workspace
        self.use_tensor_cores = use_tensor_cores
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_dtype = q_dtype
        self.kv_dtype = kv_dtype

    def paged(self) -> PagedDecode:
        return _FlashInferPagedDecode(self)

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        from flashinfer import single_decode_with_kv_cache

        return single_decode_with_kv_cache(
            q,
            k,
            v,
            kv_layout="NHD",
            use_tensor_cores=self.use_tensor_cores,
            sm_scale=sm_scale,
            logits_soft_cap=logit_cap or None,
        )
