"""The FreeKV attention backends' common part, and the ``torch_native`` one: the CPU serving path.

:class:`FreeKVBackendMixin` is what both FreeKV backends (this one and
:mod:`freekv_sglang.sglang.flashinfer_backend`) add to their SGLang base; every call comes from
the scheduler thread that runs the model:

- ``init_forward_metadata`` (once per forward batch): SGLang's own, then the runtime adopts
  the batch and, for a decode batch with a request over budget that holds a budget region,
  the runtime's page-table decode (:class:`~freekv_sglang.runtime.FreeKVPagedDecode`) plans;
- ``forward_extend`` (prefill and each chunk of a chunked prefill) is SGLang's, followed by
  the offload of the pages the chunk filled;
- ``forward_decode`` without a plan is SGLang's (then the offload); with one, it writes the
  step's K/V as SGLang does, offloads a page that just filled, and the page-table decode
  attends: every request that is not sparse with the kernel set's whole-context decode, the
  sparse ones with the FreeKV step over their sink + window and budget slots.

:class:`FreeKVTorchNativeBackend` runs that decode with :class:`SdpaDecodeKernels`: SGLang's
own per-request SDPA for whole-context decodes (so requests within budget get outputs
bit-identical to ``--kv-offload none``) and the plain-torch reference for the sparse
requests' table (sink, window and budget slots, all rows of SGLang's pool).

Under SGLang's decode graph runner (``init_cuda_graph_state``, then
``init_forward_metadata_out_graph`` before each capture and replay; only the CPU backend so
far, where nothing is captured but the same calls come) every decode batch takes the fixed
form of :class:`~freekv_sglang.runtime.graph_decode.GraphDecode`: the host part (adoption,
offload of the previous step's filled pages, plan) in ``out_graph``, device work only in
``forward_decode``; padding rows stay inert.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch import Tensor

from freekv_sglang import runtime as rt_mod
from freekv_sglang.ops import PageTable
from freekv_sglang.paged_attention import (
    DecodeKernels,
    FixedTable,
    PagedDecode,
    ReferenceDecodeKernels,
)
from freekv_sglang.runtime.graph_decode import GraphDecode
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.sglang.attach import attach_runtime

logger = logging.getLogger(__name__)


class FreeKVBackendMixin:
    """What both FreeKV attention backends add to their SGLang base (see the module doc): the
    base class provides the pools, :meth:`_init_freekv` the runtime and its page-table
    decode, and the subclass :meth:`_write_kv` (its base's K/V write)."""

    freekv: rt_mod.FreeKVRuntime
    token_to_kv_pool: Any
    req_to_token_pool: Any

    def _init_freekv(
        self, model_runner: Any, settings: FreeKVSettings, kernels: DecodeKernels, head_dim: int
    ) -> None:
        self.freekv = attach_runtime(model_runner, settings)
        self._decode = rt_mod.FreeKVPagedDecode(self.freekv, kernels)
        self._graph: GraphDecode | None = None  # set once SGLang's graph runner starts
        self._head_dim = head_dim
        # Softmax scale and logit cap the plans are made with; set from the first layer seen
        # (every prefill runs before its decode) and checked per layer.
        self._sm_scale: float | None = None
        self._logit_cap = 0.0

    def _adopt_batch(self, forward_batch: Any) -> tuple[list[int], list[int]] | None:
        """Let the runtime adopt a prefill or decode batch (``begin_forward``); returns its
        request rows and lengths (host lists), or None for other batches."""
        mode = forward_batch.forward_mode
        if not (mode.is_decode() or mode.is_extend()) or forward_batch.batch_size == 0:
            return None
        rows_t = forward_batch.req_pool_indices_cpu
        if rows_t is None:
            rows_t = forward_batch.req_pool_indices.cpu()
        lens_t = forward_batch.seq_lens_cpu
        if lens_t is None:
            lens_t = forward_batch.seq_lens.cpu()
        rows = [int(r) for r in rows_t.tolist()]
        lens = [int(n) for n in lens_t.tolist()]
        self.freekv.begin_forward(rows, lens, forward_batch.rids, decode=mode.is_decode())
        return rows, lens

    def init_forward_metadata(self, forward_batch: Any) -> None:
        if self._graph is not None and forward_batch.forward_mode.is_decode():
            self.init_forward_metadata_out_graph(forward_batch)  # the graphs' form, eagerly
            return
        super().init_forward_metadata(forward_batch)  # type: ignore[misc]
        adopted = self._adopt_batch(forward_batch)
        if adopted is None or not forward_batch.forward_mode.is_decode():
            self._decode.reset()
            return
        rows, lens = adopted
        scale = self._sm_scale if self._sm_scale is not None else self._head_dim**-0.5
        self._decode.plan(rows, lens, self.req_to_token_pool.req_to_token, scale, self._logit_cap)

    # --- decode under SGLang's CUDA-graph runner --------------------------------------------

    def _init_graph(self, max_bs: int) -> None:
        """Decode every batch in the fixed form a CUDA graph holds (:class:`GraphDecode`) from
        now on, for up to SGLang's request rows (its eager batches too, so both compute
        alike); batches of at most ``max_bs`` rows (the graphs') in the kernels' fixed form. A
        step's filled pages are offloaded after it (:mod:`freekv_sglang.runtime.fill` says why
        that is safe)."""
        if getattr(self, "use_sliding_window_kv_pool", False):
            raise FreeKVStartupError(
                "--kv-offload freekv under CUDA graphs does not support sliding-window layers"
            )
        pool = self.token_to_kv_pool
        r2t = self.req_to_token_pool.req_to_token
        rows = max(max_bs, r2t.shape[0])
        try:
            self._graph = GraphDecode(self.freekv, self._decode.kernels, rows, r2t, max_bs)
        except ValueError as e:
            raise FreeKVStartupError(f"--kv-offload freekv under CUDA graphs: {e}") from None
        self.freekv.defer_offload(
            lambda layer: (pool.get_key_buffer(layer), pool.get_value_buffer(layer)), r2t
        )
        logger.info(
            "freekv: decode in fixed form under SGLang's graph runner (graphs of up to %d rows)",
            max_bs,
        )

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Host part of a decode step (before a capture, before each replay, and of an eager
        batch in graph mode): the runtime adopts the batch's live rows (a replayed batch has
        no rids: rows name the requests; SGLang's padding rows come last and stay inert, as
        do all rows of a capture's dummy batch), then the fixed-form plan."""
        if self._graph is None or not forward_batch.forward_mode.is_decode():
            super().init_forward_metadata_out_graph(forward_batch, in_capture)  # type: ignore[misc]
            return
        bs = forward_batch.batch_size
        live = 0 if in_capture else bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        rows_t = getattr(forward_batch, "req_pool_indices_cpu", None)
        if rows_t is None:
            rows_t = forward_batch.req_pool_indices.cpu()
        lens_t = forward_batch.seq_lens_cpu
        if lens_t is None:
            lens_t = forward_batch.seq_lens.cpu()
        rows = [int(r) for r in rows_t[:bs].tolist()]
        lens = [int(n) for n in lens_t[:bs].tolist()]
        rids = getattr(forward_batch, "rids", None)
        if rids is not None:  # an eager batch SGLang padded (its rids are the live rows')
            live = min(live, len(rids))
        self.freekv.begin_forward(
            rows[:live], lens[:live], None if rids is None else list(rids)[:live], decode=True
        )
        scale = self._sm_scale if self._sm_scale is not None else self._head_dim**-0.5
        r2t = self.req_to_token_pool.req_to_token
        self._graph.plan(rows, lens, live, r2t, scale, self._logit_cap)

    def _graph_decode(self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any) -> Any:
        """A layer's decode in the fixed form: the K/V write, then device work only."""
        assert self._graph is not None
        if k is not None and v is not None:
            self._write_kv(k, v, layer, forward_batch)
        hq, d = layer.tp_q_head_num, layer.head_dim
        kv = (
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
        )
        scale = self._sm_scale if self._sm_scale is not None else self._head_dim**-0.5
        q3 = q.contiguous().view(-1, hq, d)
        return self._graph.forward(layer.layer_id, q3, kv, scale, self._logit_cap).view(-1, hq * d)

    def _note_layer(self, layer: Any) -> None:
        """Record the model's softmax scale and logit cap (the plans' parameters) from its
        first layer; a later layer with other values is refused rather than misattended."""
        scale = float(layer.scaling) if layer.scaling is not None else self._head_dim**-0.5
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        if self._sm_scale is None:
            self._sm_scale, self._logit_cap = scale, cap
        elif (scale, cap) != (self._sm_scale, self._logit_cap):
            raise FreeKVStartupError(
                f"--kv-offload freekv needs one softmax scale and logit cap for all layers; "
                f"layer {layer.layer_id} has {scale}, {cap} (first: {self._sm_scale}, "
                f"{self._logit_cap})"
            )

    def _offload(self, layer_id: int) -> None:
        self.freekv.after_kv_write(
            layer_id,
            self.token_to_kv_pool.get_key_buffer(layer_id),
            self.token_to_kv_pool.get_value_buffer(layer_id),
            self.req_to_token_pool.req_to_token,
        )

    def forward_extend(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        self._note_layer(layer)
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
        if save_kv_cache and not layer.is_cross_attention:
            self._offload(layer.layer_id)
        return o

    def forward_decode(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        self._note_layer(layer)
        if self._graph is not None:
            return self._graph_decode(q, k if save_kv_cache else None, v, layer, forward_batch)
        if not self._decode.planned:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
            if save_kv_cache and k is not None:
                self._offload(layer.layer_id)
            return o
        if save_kv_cache and k is not None and v is not None:
            self._write_kv(k, v, layer, forward_batch)
            self._offload(layer.layer_id)
        hq, d = layer.tp_q_head_num, layer.head_dim
        o = self._decode.forward(
            layer.layer_id,
            q.contiguous().view(-1, hq, d),
            (
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            ),
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            self.req_to_token_pool.req_to_token,
        )
        return o.view(-1, hq * d)

    def _write_kv(self, k: Any, v: Any, layer: Any, forward_batch: Any) -> None:
        raise NotImplementedError


class _SdpaPagedDecode:
    """A paged decode of a whole-context table run by SGLang's torch-native SDPA over the
    planned slot table (bit-identical to SGLang's own decode); a table of bounded width (the
    attended table of sparse requests: ``max_kv_len`` set) runs the plain-torch reference,
    whose shapes that bound fixes (SGLang's per-request SDPA has shapes that vary with each
    request's length: no decode step of fixed form could hold it)."""

    def __init__(self, backend: TorchNativeAttnBackend) -> None:
        self._backend = backend
        self._ref: PagedDecode | None = None  # the bounded table's decode, once planned
        self._table: PageTable | None = None
        self._lse: PagedDecode | None = None  # a whole-context table's LSE run, once asked
        self._scale = 0.0
        self._slots: Tensor | None = None  # [B, longest] slot table of the planned requests
        self._lens: Tensor | None = None

    def plan(self, table: PageTable, sm_scale: float, logit_cap: float) -> None:
        if logit_cap:
            raise ValueError("the torch-native decode has no logit soft cap")
        self._table, self._lse = table, None
        if table.max_kv_len is not None:
            if self._ref is None:
                self._ref = ReferenceDecodeKernels().paged()
            self._ref.plan(table, sm_scale, logit_cap)
            return
        self._ref = None
        self._scale = sm_scale
        ptr = table.kv_indptr.to(torch.int64)
        lens = ptr[1:] - ptr[:-1]
        width = int(lens.max()) if lens.numel() else 0
        pos = torch.arange(width)
        ok = pos.unsqueeze(0) < lens.unsqueeze(1)
        flat = torch.where(ok, ptr[:-1].unsqueeze(1) + pos, 0)
        idx = table.kv_indices.to(torch.int64)
        self._slots = torch.where(ok.to(idx.device), idx[flat.to(idx.device)], 0)
        self._lens = lens

    def run(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        if self._ref is not None:
            return self._ref.run(q, kv)
        assert self._slots is not None and self._lens is not None, "run before plan"
        o = torch.empty_like(q)
        self._backend._run_sdpa_forward_decode(
            q, o, kv[0], kv[1], self._slots, torch.arange(q.shape[0]), self._lens, None,
            scaling=self._scale, enable_gqa=q.shape[1] != kv[0].shape[1], causal=False,
            is_cross_attn=False, sliding_window_size=None,
        )  # fmt: skip
        return o

    def run_with_lse(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """SGLang's SDPA gives no LSE: a whole-context table runs the reference here (planned
        at the first such run after a plan)."""
        if self._ref is not None:
            return self._ref.run_with_lse(q, kv)
        if self._lse is None:
            if self._table is None:
                raise RuntimeError("run before plan")
            self._lse = ReferenceDecodeKernels().paged()
            self._lse.plan(self._table, self._scale, 0.0)
        return self._lse.run_with_lse(q, kv)

    def buffers(self) -> list[Tensor]:
        if self._ref is not None:
            return self._ref.buffers()
        return [t for t in (self._slots, self._lens) if t is not None]


class SdpaDecodeKernels:
    """:class:`~freekv_sglang.paged_attention.DecodeKernels` of the CPU serving path: SGLang's
    torch-native SDPA."""

    def __init__(self, backend: TorchNativeAttnBackend) -> None:
        self._backend = backend
        self._ref = ReferenceDecodeKernels()

    def paged(self, fixed: FixedTable | None = None) -> PagedDecode:
        """SGLang's SDPA for whole-context tables; in the fixed form (a graph's) the reference,
        whose shapes the tables' bound fixes."""
        if fixed is not None:
            return self._ref.paged(fixed)
        return _SdpaPagedDecode(self._backend)

    def merge(self, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
        return self._ref.merge(o_a, lse_a, o_b, lse_b)

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        if logit_cap:
            raise ValueError("the torch-native decode has no logit soft cap")
        n = k.shape[0]
        o = torch.empty_like(q).unsqueeze(0)
        self._backend._run_sdpa_forward_decode(
            q.unsqueeze(0), o, k, v, torch.arange(n, device=k.device).view(1, n),
            torch.zeros(1, dtype=torch.int64), torch.tensor([n]), None, scaling=sm_scale,
            enable_gqa=q.shape[0] != k.shape[1], causal=False, is_cross_attn=False,
            sliding_window_size=None,
        )  # fmt: skip
        return o[0]


class FreeKVTorchNativeBackend(FreeKVBackendMixin, TorchNativeAttnBackend):
    """SGLang's torch-native backend whose decode attends FreeKV's budget (see module doc)."""

    def __init__(self, model_runner: Any, settings: FreeKVSettings) -> None:
        super().__init__(model_runner)
        head_dim = model_runner.token_to_kv_pool.head_dim
        self._init_freekv(model_runner, settings, SdpaDecodeKernels(self), head_dim)

    def forward_decode(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        sliding = layer.sliding_window_size is not None and layer.sliding_window_size > -1
        if layer.is_cross_attention or sliding:
            return TorchNativeAttnBackend.forward_decode(
                self, q, k, v, layer, forward_batch, save_kv_cache
            )
        return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """SGLang's graph runner starts: every decode batch takes the fixed form from now on."""
        self._init_graph(max_bs)

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def _write_kv(self, k: Any, v: Any, layer: Any, forward_batch: Any) -> None:
        self.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
        )
