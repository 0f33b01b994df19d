"""SGLang's ``flashinfer`` attention backend with FreeKV decode: the GPU serving path.

:class:`FreeKVFlashInferBackend` subclasses SGLang's ``FlashInferAttnBackend`` and, like the
CPU path (:mod:`freekv_sglang.sglang.attention_backend`), delegates every FreeKV decision to
the process's :class:`~freekv_sglang.runtime.FreeKVRuntime`; the batch split and the
attention over page tables are :class:`~freekv_sglang.runtime.paged_decode.FreeKVPagedDecode`'s,
run with FlashInfer's kernels
(:class:`~freekv_sglang.flashinfer_kernels.FlashInferDecodeKernels`). All calls come from the
scheduler thread that runs the model; all GPU work is queued on the current (forward) stream.

- ``init_forward_metadata`` (once per forward batch): SGLang's own planning, then the runtime
  adopts the batch and, for a decode batch with requests over budget, FreeKV plans its paged
  decodes (``FreeKVPagedDecode.plan``).
- ``forward_extend`` is SGLang's (prefill and chunked prefill), then the offload of the pages
  the chunk filled.
- ``forward_decode`` writes the step's K/V as SGLang does and offloads a page that just filled.
  Without FreeKV plans it is SGLang's decode; otherwise ``FreeKVPagedDecode.forward`` attends.

FreeKV's paged decodes share SGLang's float workspace: they run one after another on the
forward stream, as SGLang's own prefill and decode wrappers do.

Under SGLang's decode graph runner (``--cuda-graph-backend-decode`` other than ``disabled``)
``init_cuda_graph_state`` switches every decode batch to the fixed form of
:class:`~freekv_sglang.runtime.graph_decode.GraphDecode`, as on the CPU path: its host part in
``init_forward_metadata_out_graph`` (the mixin's), device work only in ``forward_decode``, the
paged decodes FlashInfer wrappers made for CUDA graphs on fixed buffers, one per captured batch
size and table kind. SGLang's own decode wrappers are not made: no decode batch reaches them.
Prefill graphs stay refused (the offload after each layer's prefill is host work).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from freekv_sglang.flashinfer_kernels import FlashInferDecodeKernels
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.sglang.attention_backend import FreeKVBackendMixin

logger = logging.getLogger(__name__)


class FreeKVFlashInferBackend(FreeKVBackendMixin, FlashInferAttnBackend):
    """SGLang's FlashInfer backend whose decode attends FreeKV's budget (see module doc)."""

    def __init__(self, model_runner: Any, settings: FreeKVSettings, **kwargs: Any) -> None:
        if torch.device(model_runner.device).type != "cuda":
            raise FreeKVStartupError(
                "--kv-offload freekv with --attention-backend flashinfer needs --device cuda; "
                "on a CPU use --attention-backend torch_native"
            )
        super().__init__(model_runner, **kwargs)
        if self.use_sliding_window_kv_pool or self.num_wrappers != 1:
            raise FreeKVStartupError(
                "--kv-offload freekv does not support models with sliding-window or "
                "cross-attention layers on the flashinfer backend"
            )
        upd = self.indices_updater_decode
        kernels = FlashInferDecodeKernels(
            self.workspace_buffer,
            use_tensor_cores=self.decode_use_tensor_cores,
            num_qo_heads=upd.num_qo_heads,
            num_kv_heads=upd.num_kv_heads,
            head_dim=upd.head_dim,
            q_dtype=upd.q_data_type,
            kv_dtype=upd.data_type,
        )
        self._init_freekv(model_runner, settings, kernels, upd.head_dim)
        logger.info(
            "freekv: FlashInfer decode over page tables (sink+window, budget slots), "
            "speculative recall on its own stream"
        )

    def init_cuda_graph_state(
        self, max_bs: int, max_num_tokens: int, kv_indices_buf: Any = None
    ) -> None:
        """SGLang's graph runner starts: every decode batch takes the fixed form from now on
        (see module doc); FreeKV allocates its own table buffers."""
        self._init_graph(max_bs)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def _write_kv(self, k: Any, v: Any, layer: Any, forward_batch: Any) -> None:
        # In graph mode SGLang's decode metadata is never made (the graph runner captures
        # before any batch ran, when it is None); FreeKV refuses sliding-window pools, so
        # there is no SWA write target to take from it.
        swa = getattr(self.forward_metadata, "swa_out_cache_loc", None)
        self.token_to_kv_pool.set_kv_buffer(
            layer,
            KVWriteLoc.for_layer(forward_batch, layer, swa_loc=swa),
            k,
            v,
            *self._kv_write_scales(layer),
        )
