"""SGLang's ``flashinfer`` attention backend with FreeKV decode: the GPU serving path.

:class:`FreeKVFlashInferBackend` subclasses SGLang's ``FlashInferAttnBackend`` and, like the
CPU path (:mod:`freekv_sglang.sglang.attention_backend`), delegates every FreeKV decision to
the process's :class:`~freekv_sglang.sglang.runtime.FreeKVRuntime`. All calls come from the
scheduler thread that runs the model; all GPU work is queued on the current (forward) stream.

- ``init_forward_metadata`` (once per forward batch): SGLang's own planning, then the runtime
  adopts the batch. A decode batch with requests over budget also gets FreeKV's plans, each one
  FlashInfer decode wrapper planned once for every layer of the step (token-level page
  tables, NHD, their ``kv_indptr`` built on the host so planning never syncs the device):

  * ``fixed``: sink + window token slots of each request over budget (SGLang's pool);
  * ``selected``: its budget slots (the runtime's slot buffers), which hold each KV head's
    selected pages (:class:`~freekv_sglang.sglang.runtime.AttendedTables` says why one table
    serves every head);
  * ``fit``: the other requests, over their whole context (sparse layers);
  * ``near``: the requests without reclaimed slots, over their whole context (dense layers).

- ``forward_extend`` is SGLang's (prefill and chunked prefill), then the offload of the pages
  the chunk filled.
- ``forward_decode`` writes the step's K/V as SGLang does and offloads a page that just filled.
  Without FreeKV plans (no request over budget) it is SGLang's decode. Otherwise, in a sparse
  layer, requests that fit run the ``fit`` plan and requests over budget the runtime's FreeKV
  step, whose attention runs the ``fixed`` and ``selected`` plans and merges the two partial
  results by their log-sum-exp (``flashinfer.merge_state``). In a dense layer, requests without
  reclaimed slots run the ``near`` plan and each other request attends its full K/V, gathered
  from its device slots and the host pool (``full_kv``), with FlashInfer's single decode.

The wrappers share SGLang's float workspace: they run one after another on the forward stream,
as SGLang's own prefill and decode wrappers do. CUDA graphs stay off under FreeKV (the
resolution hook declares it): its decode does host-side bookkeeping every step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch import Tensor

from freekv_sglang.ops import PageTable
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.sglang.attention_backend import FreeKVBackendMixin, attach_runtime
from freekv_sglang.sglang.runtime import token_table

logger = logging.getLogger(__name__)


class _StepPlan:
    """FreeKV's decode plans of one forward batch (indices into the batch, CPU lists)."""

    def __init__(self, over_rows: list[int], far: list[tuple[int, int, int]]) -> None:
        self.over_rows = over_rows  # request rows of the requests over budget
        self.far = far  # (batch index, row, length) of requests with reclaimed slots
        self.over_idx: Tensor | None = None
        self.fit_idx: Tensor | None = None
        self.near_idx: Tensor | None = None


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
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        def wrapper() -> Any:
            return BatchDecodeWithPagedKVCacheWrapper(
                self.workspace_buffer, "NHD", use_tensor_cores=self.decode_use_tensor_cores
            )

        self._w_fixed = wrapper()
        self._w_selected = wrapper()
        self._w_fit = wrapper()
        self._w_near = wrapper()
        upd = self.indices_updater_decode
        self._num_qo_heads = upd.num_qo_heads
        self._num_kv_heads = upd.num_kv_heads
        self._head_dim = upd.head_dim
        self._q_dtype = upd.q_data_type
        self._kv_dtype = upd.data_type
        # Softmax scale and logit cap the plans were made with; set from the first layer seen
        # (every prefill runs before its decode) and checked per layer.
        self._sm_scale: float | None = None
        self._logit_cap: float = 0.0
        self._plan: _StepPlan | None = None
        logger.info(
            "freekv: FlashInfer decode over page tables (sink+window, budget slots), "
            "speculative recall on its own stream"
        )

    # --- planning -----------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._plan = None
        adopted = self._adopt_batch(forward_batch)
        if adopted is None or not forward_batch.forward_mode.is_decode():
            return
        rows, lens = adopted
        fkv = self.freekv
        budget = fkv.cfg.total_budget_tokens
        over = [i for i, n in enumerate(lens) if n > budget]
        if not over:
            return  # no reclaimed slots either: SGLang's own plan is exact for every layer
        far = [(i, r, lens[i]) for i, r in enumerate(rows) if fkv.has_reclaimed(r)]
        fit = [i for i, n in enumerate(lens) if n <= budget]
        far_set = {i for i, _, _ in far}
        near = [i for i in range(len(rows)) if i not in far_set]
        plan = _StepPlan([rows[i] for i in over], far)
        dev = forward_batch.seq_lens.device
        req_to_token = self.req_to_token_pool.req_to_token
        fkv.ensure_regions(plan.over_rows)
        tables = fkv.attended_tables(plan.over_rows, [lens[i] for i in over], req_to_token)
        self._plan_wrapper(self._w_fixed, tables.fixed)
        self._plan_wrapper(self._w_selected, tables.selected)
        plan.over_idx = torch.tensor(over, device=dev)
        for sub, w, attr in ((fit, self._w_fit, "fit_idx"), (near, self._w_near, "near_idx")):
            if sub:
                table = token_table(
                    [rows[i] for i in sub], [[(0, lens[i])] for i in sub], req_to_token
                )
                self._plan_wrapper(w, table)
                setattr(plan, attr, torch.tensor(sub, device=dev))
        self._plan = plan

    def _plan_wrapper(self, wrapper: Any, table: PageTable) -> None:
        n = int(table.kv_indptr[-1])
        wrapper.plan(
            table.kv_indptr,
            table.kv_indices[:n],
            table.kv_last_page_len,
            self._num_qo_heads,
            self._num_kv_heads,
            self._head_dim,
            1,
            q_data_type=self._q_dtype,
            kv_data_type=self._kv_dtype,
            sm_scale=self._sm_scale,
            logits_soft_cap=self._logit_cap or None,
            non_blocking=True,
        )

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

    # --- forward ------------------------------------------------------------------------------

    def forward_extend(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        self._note_layer(layer)
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        self._note_layer(layer)
        plan = self._plan
        if plan is None:
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
        q_ = q.contiguous().view(-1, hq, d)
        o_ = torch.empty_like(q_)
        kv = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        fkv = self.freekv
        if fkv.cfg.is_dense_layer(layer.layer_id):
            if plan.near_idx is not None:
                o_[plan.near_idx] = self._w_near.run(q_[plan.near_idx], kv)
            self._far_dense(q_, o_, plan, layer, kv)
        else:
            if plan.fit_idx is not None:
                o_[plan.fit_idx] = self._w_fit.run(q_[plan.fit_idx], kv)
            if plan.over_idx is not None:
                o_[plan.over_idx] = self._sparse(q_[plan.over_idx], plan, layer, forward_batch, kv)
        return o_.view(-1, hq * d)

    def _sparse(
        self, q: Tensor, plan: _StepPlan, layer: Any, forward_batch: Any, kv: Any
    ) -> Tensor:
        """The FreeKV step of the requests over budget in one sparse layer."""
        assert plan.over_idx is not None
        rows = forward_batch.req_pool_indices[plan.over_idx].to(torch.int64)
        lens = forward_batch.seq_lens[plan.over_idx].to(torch.int64)
        fixed, selected = self._w_fixed, self._w_selected
        fkv = self.freekv

        def attend(layer_id: int, q_: Tensor, _rows: Tensor, _lens: Tensor, _pages: Tensor):
            from flashinfer import merge_state

            o_a, s_a = fixed.run(q_, kv, return_lse=True)
            o_b, s_b = selected.run(q_, fkv.slot_buffers(layer_id), return_lse=True)
            return merge_state(o_a, s_a, o_b, s_b)[0]

        k_cache, v_cache = kv
        return fkv.sparse_decode(
            layer.layer_id,
            q,
            rows,
            lens,
            k_cache,
            v_cache,
            self.req_to_token_pool.req_to_token,
            self._sm_scale if self._sm_scale is not None else self._head_dim**-0.5,
            attend=attend,
            row_list=plan.over_rows,
        )

    def _far_dense(self, q_: Tensor, o_: Tensor, plan: _StepPlan, layer: Any, kv: Any) -> None:
        """Dense layer, requests whose offloaded pages gave their device slots back: each
        attends its full K/V, read from its slots and the host pool."""
        if not plan.far:
            return
        from flashinfer import single_decode_with_kv_cache

        k_cache, v_cache = kv
        for i, row, n in plan.far:
            k, v = self.freekv.full_kv(
                layer.layer_id, row, n, k_cache, v_cache, self.req_to_token_pool.req_to_token
            )
            o_[i] = single_decode_with_kv_cache(
                q_[i],
                k,
                v,
                kv_layout="NHD",
                sm_scale=self._sm_scale,
                logits_soft_cap=self._logit_cap or None,
            )
