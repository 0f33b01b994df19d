"""FlashInfer's kernels as the :class:`~freekv_sglang.paged_attention.DecodeKernels` of FreeKV's
page-table decode (:mod:`freekv_sglang.runtime.paged_decode`).

Built by the FlashInfer backend (:mod:`freekv_sglang.sglang.flashinfer_backend`) on SGLang's
float workspace; every call comes from the scheduler thread and queues on the current stream.
Plans share the workspace because their runs never overlap: they run one after another on the
forward stream, as SGLang's own wrappers do. Imports neither SGLang nor the Rust extension, so
``benchmarks/gpu_check.py`` checks this very code on a bare GPU host.

A decode in fixed form (:class:`~freekv_sglang.paged_attention.FixedTable`: what SGLang's
decode graph runner captures) is a wrapper made with ``use_cuda_graph=True`` on buffers it
keeps: ``kv_indptr`` and ``kv_last_page_len`` of its batch size, and ``kv_indices`` shared by
every decode of the same ``share`` (one per batch size, never two planned for one step), as
SGLang's own graph wrappers share one. FlashInfer's ``plan`` writes the table into them (host
part, before a capture or a replay); ``run`` reads only them, so a replay attends the table of
the last plan.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops.page_table import PageTable
from freekv_sglang.paged_attention import (
    EntryBuffers,
    FixedTable,
    PagedDecode,
    check_fixed_table,
)

__all__ = ["FlashInferDecodeKernels"]


class _FlashInferPagedDecode:
    """A ``BatchDecodeWithPagedKVCacheWrapper`` on SGLang's float workspace (NHD); in the fixed
    form, made for CUDA graphs on the kernel set's buffers of its ``share``."""

    def __init__(self, kernels: FlashInferDecodeKernels, fixed: FixedTable | None) -> None:
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        self._k = kernels
        self._fixed = fixed
        self._buffers: tuple[Tensor, ...] = ()
        if fixed is None:
            self._wrapper = BatchDecodeWithPagedKVCacheWrapper(
                kernels.workspace, "NHD", use_tensor_cores=kernels.use_tensor_cores
            )
            return
        dev = kernels.workspace.device
        self._buffers = (
            torch.zeros(fixed.rows + 1, dtype=torch.int32, device=dev),
            kernels.entries.get(fixed, dev),
            torch.ones(fixed.rows, dtype=torch.int32, device=dev),
        )
        self._wrapper = BatchDecodeWithPagedKVCacheWrapper(
            kernels.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=kernels.use_tensor_cores,
            paged_kv_indptr_buffer=self._buffers[0],
            paged_kv_indices_buffer=self._buffers[1],
            paged_kv_last_page_len_buffer=self._buffers[2],
        )

    def plan(self, table: PageTable, sm_scale: float, logit_cap: float) -> None:
        k = self._k
        if self._fixed is not None:
            n = check_fixed_table(table, self._fixed)
        else:
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

    def run_with_lse(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        o, lse = self._wrapper.run(q, kv, return_lse=True)
        return o, lse

    def buffers(self) -> list[Tensor]:
        return list(self._buffers)


class FlashInferDecodeKernels:
    """:class:`~freekv_sglang.paged_attention.DecodeKernels` by FlashInfer: batch decode
    wrappers (eager or for CUDA graphs), ``merge_state`` and ``single_decode_with_kv_cache``
    (LSE in base 2).

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
        self.entries = EntryBuffers()  # the fixed forms' kv_indices

    def paged(self, fixed: FixedTable | None = None) -> PagedDecode:
        return _FlashInferPagedDecode(self, fixed)

    def merge(self, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
        from flashinfer import merge_state

        return merge_state(o_a, lse_a, o_b, lse_b)[0]

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
