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
forward stream, as SGLang's own prefill and decode wrappers do. CUDA graphs stay off under
FreeKV (the resolution hook declares it): its decode does host-side bookkeeping every step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from freekv_sglang.flashinfer_kernels import FlashInferDecodeKernels
from freekv_sglang.runtime.paged_decode import FreeKVPagedDecode
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.sglang.attention_backend import FreeKVBackendMixin, attach_runtime

logger = logging.getLogger(__name__)


class FreeKVFlashInferBackend(FreeKVBackendMixin, FlashInferAttnBackend):  # type: ignore[misc]
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
        self.freekv = attach_runtime(model_runner, settings)
        upd = self.indices_updater_decode
        self._head_dim: int = upd.head_dim
        self._decode = FreeKVPagedDecode(
            self.freekv,
            FlashInferDecodeKernels(
                self.workspace_buffer,
                use_tensor_cores=self.decode_use_tensor_cores,
                num_qo_heads=upd.num_qo_heads,
                num_kv_heads=upd.num_kv_heads,
                head_dim=upd.head_dim,
                q_dtype=upd.q_data_type,
                kv_dtype=upd.data_type,
            ),
        )
        # Softmax scale and logit cap the plans are made with; set from the first layer seen
        # (every prefill runs before its decode) and checked per layer.
        self._sm_scale: float | None = None
        self._logit_cap: float = 0.0
        logger.info(
            "freekv: FlashInfer decode over page tables (sink+window, budget slots), "
            "speculative recall on its own stream"
        )

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        adopted = self._adopt_batch(forward_batch)
        if adopted is None or not forward_batch.forward_mode.is_decode():
            self._decode.reset()
            return
        rows, lens = adopted
        scale = self._sm_scale if self._sm_scale is not None else self._head_dim**-0.5
        self._decode.plan(rows, lens, self.req_to_token_pool.req_to_token, scale, self._logit_cap)

    def _note_layer(self, layer: Any) -> None:
        """Record the model's softmax scale and logit cap (the plans' parameters) from its
        first layer; a later layer with other values is refused rather than misattended."""
        scale = float(layer.scaling) if layer.scaling is not None else self._head_dim**-0.5
        cap = float(layer.logit_cap or 0.0)
        if self._sm_scale is None:
            self._sm_scale, self._logit_cap = scale, cap
        elif (scale, cap) != (self._sm_scale, self._logit_cap):
            raise FreeKVStartupError(
                f"--kv-offload freekv on flashinfer needs one softmax scale and logit cap for "
                f"all layers; layer {layer.layer_id} has {scale}, {cap} (first: "
                f"{self._sm_scale}, {self._logit_cap})"
            )

    def forward_extend(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        self._note_layer(layer)
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        self._note_layer(layer)
        if not self._decode.planned:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            if save_kv_cache and k is not None:
                self._offload(layer.layer_id)
            return o
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer,
                KVWriteLoc.for_layer(
                    forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc
                ),
                k,
                v,
                *self._kv_write_scales(layer),
            )
            self._offload(layer.layer_id)
        hq, d = layer.tp_q_head_num, layer.head_dim
        o = self._decode.forward(
            layer.layer_id,
            q.contiguous().view(-1, hq, d),
            self.token_to_kv_pool.get_kv_buffer(layer.layer_id),
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            self.req_to_token_pool.req_to_token,
        )
        return o.view(-1, hq * d)
