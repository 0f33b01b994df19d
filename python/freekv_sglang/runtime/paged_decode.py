"""FreeKV decode over page tables: the GPU serving path's batch split and attention, apart from
the kernels that compute it.

:class:`FreeKVPagedDecode` is driven by the FlashInfer backend
(:mod:`freekv_sglang.sglang.flashinfer_backend`) and the torch-native backend
(:mod:`freekv_sglang.sglang.attention_backend`) from the scheduler thread that runs the model,
and queues all its device work on the current (forward) stream:

- :meth:`FreeKVPagedDecode.plan`, once per decode batch after the runtime adopted it
  (``begin_forward``): splits the batch and plans three paged decodes, each run by every layer
  of the step (token-level page tables with ``kv_indptr`` built on the host, so planning never
  syncs the device):

  * ``attended``: each sparse request's (over budget, holding a budget region:
    :meth:`~freekv_sglang.runtime.FreeKVRuntime.is_sparse`) sink + window token slots and its
    budget slots, which hold each KV head's selected pages; all are rows of SGLang's pool
    (:mod:`~freekv_sglang.runtime.tables` says why one table serves every head);
  * ``fit``: the other requests (within budget, or held dense), over their whole context
    (sparse layers);
  * ``near``: the requests without reclaimed slots, over their whole context (dense layers);
    usually the requests that fit (a sparse one gives slots back at its first decode step),
    and then ``fit``'s plan serves.

  A batch with no sparse request gets no plan: SGLang's own decode is exact for it.
- :meth:`FreeKVPagedDecode.forward`, per layer, after the step's K/V was written and offloaded:
  in a sparse layer the other requests run ``fit`` and the sparse ones the runtime's
  FreeKV step, whose attention runs ``attended`` (one launch); in a dense layer the requests without reclaimed slots run
  ``near`` and every other request attends its full K/V, gathered on the device from its slots
  and the runtime's dense-layer store (``full_kv``), with the single-request decode.

The kernels come from a :class:`~freekv_sglang.paged_attention.DecodeKernels`: FlashInfer's on
a GPU; on a CPU the adapter's torch-native backend runs SGLang's own SDPA for whole-context
decodes and the plain-torch reference for a sparse request's. Both backends
drive this one class, so the batch split exists once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from freekv_sglang.paged_attention import DecodeKernels, PagedDecode
from freekv_sglang.runtime.facade import FreeKVRuntime
from freekv_sglang.runtime.tables import token_table

__all__ = ["FreeKVPagedDecode"]


@dataclass
class _StepPlan:
    """What the layers of one planned decode step read (batch indices, CPU lists)."""

    sm_scale: float
    over_rows: list[int]  # request rows of the sparse requests
    far: list[tuple[int, int, int]]  # (batch index, row, length) of requests with reclaimed slots
    over_idx: Tensor | None  # batch indices of the sparse requests (device); None: all
    fit_idx: Tensor | None  # batch indices of the requests that fit (device), if any
    near_idx: Tensor | None  # batch indices of the requests without reclaimed slots, if any
    near_paged: PagedDecode  # the decode planned over them (the fit one when they coincide)


class FreeKVPagedDecode:
    """Plans and runs FreeKV's decode over page tables for one model runner (see module doc)."""

    def __init__(self, runtime: FreeKVRuntime, kernels: DecodeKernels) -> None:
        self.runtime = runtime
        self.kernels = kernels
        self._attended = kernels.paged()
        self._fit = kernels.paged()
        self._near = kernels.paged()
        self._logit_cap = 0.0
        self._step: _StepPlan | None = None
        # Allocated once (the tables by the runtime's decode step), the batch indices of each
        # group, so a layer's work reads the same addresses at every step of a batch size.
        self._index: dict[str, Tensor] = {}

    @property
    def planned(self) -> bool:
        """Whether the current batch has FreeKV plans (some request is sparse)."""
        return self._step is not None

    def reset(self) -> None:
        """Drop the plans: the next batch is not a FreeKV decode batch."""
        self._step = None

    def plan(
        self,
        rows: list[int],
        lens: list[int],
        req_to_token: Tensor,
        sm_scale: float,
        logit_cap: float = 0.0,
    ) -> bool:
        """Plan the decode batch of request rows ``rows`` with lengths ``lens`` (this step's
        token included; the runtime adopted the batch). Returns :attr:`planned`."""
        self._step = None
        if len(rows) != len(lens):
            raise ValueError(f"{len(rows)} rows but {len(lens)} lengths")
        fkv = self.runtime
        over = [i for i, r in enumerate(rows) if fkv.is_sparse(r)]
        if not over:
            return False  # no reclaimed slots either: reclaim needs a budget region
        over_set = set(over)
        fit = [i for i in range(len(rows)) if i not in over_set]
        far = [(i, r, lens[i]) for i, r in enumerate(rows) if fkv.has_reclaimed(r)]
        far_set = {i for i, _, _ in far}
        near = [i for i in range(len(rows)) if i not in far_set]
        over_rows = [rows[i] for i in over]
        over_lens = [lens[i] for i in over]
        fkv.prepare_sparse(over_rows, over_lens)
        table = fkv.attended_table(over_rows, over_lens, req_to_token, fkv.decode.tables)
        self._attended.plan(table, sm_scale, logit_cap)
        fit_idx = self._plan_whole(
            self._fit, "fit", fit, rows, lens, req_to_token, sm_scale, logit_cap
        )
        # Usually the same requests (a sparse request gives slots back at once): one plan.
        near_paged = self._fit
        near_idx = fit_idx
        if near != fit:
            near_paged = self._near
            near_idx = self._plan_whole(
                self._near, "near", near, rows, lens, req_to_token, sm_scale, logit_cap
            )
        self._logit_cap = logit_cap
        self._step = _StepPlan(
            sm_scale=sm_scale,
            over_rows=over_rows,
            far=far,
            over_idx=None
            if not fit
            else self._batch_index("over", over, req_to_token.shape[0], req_to_token.device),
            fit_idx=fit_idx,
            near_idx=near_idx,
            near_paged=near_paged,
        )
        return True

    def _batch_index(self, name: str, sub: list[int], rows: int, device: torch.device) -> Tensor:
        """``sub`` (batch indices) on the device: a view of the first ``len(sub)`` entries of
        its group's buffer, allocated once for ``rows`` (SGLang's request rows) entries."""
        buf = self._index.get(name)
        if buf is None:
            buf = self._index[name] = torch.zeros(rows, dtype=torch.int64, device=device)
        view = buf[: len(sub)]
        view.copy_(torch.tensor(sub, dtype=torch.int64), non_blocking=True)
        return view

    def _plan_whole(
        self,
        paged: PagedDecode,
        name: str,
        sub: list[int],
        rows: list[int],
        lens: list[int],
        req_to_token: Tensor,
        sm_scale: float,
        logit_cap: float,
    ) -> Tensor | None:
        """Plan ``paged`` over the whole context of batch entries ``sub``; their indices."""
        if not sub:
            return None
        whole = token_table([rows[i] for i in sub], [[(0, lens[i])] for i in sub], req_to_token)
        paged.plan(whole, sm_scale, logit_cap)
        return self._batch_index(name, sub, req_to_token.shape[0], req_to_token.device)

    def forward(
        self,
        layer: int,
        q: Tensor,
        kv: tuple[Tensor, Tensor],
        req_pool_indices: Tensor,
        seq_lens: Tensor,
        req_to_token: Tensor,
    ) -> Tensor:
        """Decode attention of ``q [B, H_q, D]`` (the planned batch, in its order) in ``layer``
        over SGLang's ``kv`` (``[slots, H, D]`` keys and values, this step's already written);
        returns ``[B, H_q, D]``. ``req_pool_indices`` must be the planned rows (the plan holds
        them on the host; the device copy is not read)."""
        step = self._step
        if step is None:
            raise RuntimeError("FreeKVPagedDecode.forward without a plan for this batch")
        o = torch.empty_like(q)
        if self.runtime.cfg.is_dense_layer(layer):
            if step.near_idx is not None:
                o[step.near_idx] = step.near_paged.run(q[step.near_idx], kv)
            self._far_dense(layer, q, o, kv, req_to_token, step)
            return o
        if step.over_idx is None:  # every request is sparse: no gather, no scatter
            return self._sparse(layer, q, kv, step)
        if step.fit_idx is not None:
            o[step.fit_idx] = self._fit.run(q[step.fit_idx], kv)
        o[step.over_idx] = self._sparse(layer, q[step.over_idx], kv, step)
        return o

    def _sparse(self, layer: int, q: Tensor, kv: tuple[Tensor, Tensor], step: _StepPlan) -> Tensor:
        """The FreeKV step of the sparse requests in one sparse layer (device work only)."""
        attended = self._attended
        return self.runtime.sparse_decode(layer, q, step.sm_scale, lambda q_: attended.run(q_, kv))

    def _far_dense(
        self,
        layer: int,
        q: Tensor,
        o: Tensor,
        kv: tuple[Tensor, Tensor],
        req_to_token: Tensor,
        step: _StepPlan,
    ) -> None:
        """Dense layer, requests whose offloaded pages gave their device slots back: each
        attends its full K/V, read from its slots and the host pool."""
        for i, row, n in step.far:
            k, v = self.runtime.full_kv(layer, row, n, kv[0], kv[1], req_to_token)
            o[i] = self.kernels.single(q[i], k, v, step.sm_scale, self._logit_cap)
