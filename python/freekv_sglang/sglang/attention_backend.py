"""The ``torch_native`` attention backend with FreeKV decode: the CPU serving path.

:class:`FreeKVTorchNativeBackend` subclasses SGLang's ``TorchNativeAttnBackend`` and delegates
every FreeKV decision to the process's :class:`~freekv_sglang.runtime.FreeKVRuntime`
(created here, when the model runner builds its attention backend). All calls come from the
scheduler thread that runs the model:

- ``init_forward_metadata`` (once per forward batch) lets the runtime adopt the batch;
- ``forward_extend`` (prefill and each chunk of a chunked prefill) is SGLang's, followed by
  the offload of the pages the chunk filled;
- ``forward_decode`` writes the step's K/V as SGLang does, offloads a page that just filled,
  then attends: requests whose context fits the budget (and those over it that found no free
  budget region, see :meth:`~freekv_sglang.runtime.FreeKVRuntime.is_sparse`), and every
  request in a dense layer, run SGLang's own per-request SDPA (so their outputs are
  bit-identical to ``--kv-offload none``); the other requests run the runtime's FreeKV step.
  In a dense layer a request whose offloaded pages gave their device slots back (see
  :mod:`freekv_sglang.sglang.memory`) attends over K/V gathered from its remaining slots and
  the runtime's dense-layer store, still with SGLang's SDPA.

The backend also connects the runtime to the model runner's
:class:`~freekv_sglang.sglang.memory.FreeKVTokenAllocator` (built by the allocator hook before
the backend exists): the runtime reclaims device slots into it, and bounds its capacity by the
host pool.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from freekv_sglang import runtime as rt_mod
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError

logger = logging.getLogger(__name__)


#: Default host pool: this many times the device KV pool's tokens (capped by host memory).
HOST_TO_DEVICE_RATIO = 4


def default_host_pool_bytes(
    device_tokens: int, max_seq_len: int, max_requests: int, page_size: int, page_bytes: int
) -> int:
    """Host pool size when ``--freekv-host-pool-gb`` is not given.

    :data:`HOST_TO_DEVICE_RATIO` times the device pool, so that admission can run that many
    more tokens than the device holds, but at most a quarter of the host's available memory
    (several servers may share a host; on a GPU host the pool is pinned, so all of it is
    resident); never less than the device pool plus one full-length request (what the runtime
    requires). Production deployments should size it with ``--freekv-host-pool-gb``.
    """
    pages = lambda tokens: math.ceil(tokens / page_size) + max_requests  # noqa: E731
    floor = pages(device_tokens + max_seq_len) * page_bytes
    want = pages(HOST_TO_DEVICE_RATIO * device_tokens) * page_bytes
    avail = _mem_available_bytes()
    if avail is not None:
        want = min(want, avail // 4)
    return max(floor, want)


#: Share of the device memory left after SGLang's pools that budget regions may take by default
#: (the rest stays for activations); on CPU, the share of available host memory.
REGION_SHARE = {"cuda": 0.4, "cpu": 0.125}
#: The same for the dense-layer store (the dense layers' K/V of reclaimed pages).
DENSE_STORE_SHARE = {"cuda": 0.2, "cpu": 0.0625}


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory still free on ``device`` (available host memory for a CPU); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _mem_available_bytes()


def _share(table: dict[str, float], device: torch.device) -> float:
    return table.get(device.type, table["cpu"])


def default_sparse_requests(
    max_requests: int, region_bytes: int, device: torch.device, free_bytes: int | None
) -> int:
    """Budget regions to allocate when ``--freekv-sparse-requests`` is not given: one per
    request row SGLang can run, capped at :data:`REGION_SHARE` of ``free_bytes`` (the memory
    still free, None if unknown), and at least one."""
    if free_bytes is None:
        return max_requests
    cap = int(free_bytes * _share(REGION_SHARE, device)) // max(region_bytes, 1)
    return max(1, min(max_requests, cap))


def default_dense_store_tokens(
    tokens: int, token_bytes: int, device: torch.device, free_bytes: int | None
) -> int:
    """Dense-store capacity: ``tokens`` (all a full host pool can reclaim), capped at
    :data:`DENSE_STORE_SHARE` of ``free_bytes``; ``token_bytes`` is one token's K/V in every
    dense layer. A request whose pages find no room keeps their device slots."""
    if free_bytes is None or token_bytes == 0:
        return tokens
    return min(tokens, int(free_bytes * _share(DENSE_STORE_SHARE, device)) // token_bytes)


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_runtime(model_runner: Any, settings: FreeKVSettings) -> rt_mod.FreeKVRuntime:
    """Size and create the runtime for ``model_runner`` (raises with the flag to change)."""
    if getattr(model_runner, "use_mla_backend", False):
        raise FreeKVStartupError(
            "--kv-offload freekv does not support MLA models (their latent KV cache has no "
            "per-head pages)"
        )
    cfg = settings.retrieval_config()
    pool = model_runner.token_to_kv_pool
    mc = model_runner.model_config
    tp = getattr(model_runner, "tp_size", 1) or 1
    num_q_heads = mc.num_attention_heads // tp
    num_kv_heads = pool.head_num
    head_dim = pool.head_dim
    num_layers = pool.layer_num
    bad = [i for i in cfg.dense_layers if i >= num_layers]
    if bad:
        raise FreeKVStartupError(
            f"--freekv-dense-layers names layers {bad}; the model has {num_layers} layers"
        )
    req_to_token = model_runner.req_to_token_pool.req_to_token
    max_requests, max_seq_len = req_to_token.shape
    page_bytes = 2 * num_layers * num_kv_heads * head_dim * pool.dtype.itemsize * cfg.page_size
    if settings.host_pool_gb is not None:
        host_bytes = int(settings.host_pool_gb * 2**30)
    else:
        host_bytes = default_host_pool_bytes(
            model_runner.max_total_num_tokens, max_seq_len, max_requests, cfg.page_size, page_bytes
        )
    device = torch.device(model_runner.device)
    free_bytes = free_memory_bytes(device)
    region_bytes = page_bytes * cfg.num_selected_pages  # all layers, K and V
    sparse_requests = settings.sparse_requests
    if sparse_requests is None:
        sparse_requests = default_sparse_requests(max_requests, region_bytes, device, free_bytes)
    store_token_bytes = page_bytes // cfg.page_size // num_layers * len(cfg.dense_layers)
    store_tokens = default_dense_store_tokens(
        host_bytes // page_bytes * cfg.page_size, store_token_bytes, device, free_bytes
    )
    try:
        runtime = rt_mod.FreeKVRuntime(
            cfg,
            num_layers=num_layers,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_requests=max_requests,
            max_seq_len=max_seq_len,
            dtype=pool.dtype,
            device=device,
            host_pool_bytes=host_bytes,
            conversion_threads=settings.conversion_threads,
            max_sparse_requests=sparse_requests,
            dense_store_tokens=store_tokens,
        )
    except torch.OutOfMemoryError as e:
        raise FreeKVStartupError(
            f"--kv-offload freekv: {sparse_requests} budget regions "
            f"({sparse_requests * region_bytes / 2**30:.3f} GiB) and the dense-layer store "
            f"({store_tokens * store_token_bytes / 2**30:.3f} GiB) do not fit in device "
            "memory; lower --freekv-sparse-requests or --mem-fraction-static"
        ) from e
    logger.info(
        "freekv: budget %d tokens (%d sink + %d selected pages + %d window, page %d), tau %s, "
        "dense layers %s; host pool %d pages (%.3f GiB); %d budget regions (%.3f GiB); "
        "dense store %d tokens (%.3f GiB)",
        cfg.total_budget_tokens,
        cfg.sink_tokens,
        cfg.num_selected_pages,
        cfg.window_tokens,
        cfg.page_size,
        cfg.tau,
        list(cfg.dense_layers),
        runtime.host.pool.capacity_pages,
        host_bytes / 2**30,
        sparse_requests,
        sparse_requests * region_bytes / 2**30,
        runtime.dense_store_pages * cfg.page_size,
        runtime.dense_store_pages * cfg.page_size * store_token_bytes / 2**30,
    )
    return runtime


def attach_runtime(model_runner: Any, settings: FreeKVSettings) -> rt_mod.FreeKVRuntime:
    """Build the runtime of ``model_runner``, connect it to the FreeKV token allocator (built by
    the allocator hook before any backend) and make it this process's runtime. Both FreeKV
    attention backends call this from their constructor."""
    runtime = build_runtime(model_runner, settings)
    from freekv_sglang.sglang.memory import FreeKVTokenAllocator

    allocator = model_runner.token_to_kv_pool_allocator
    if not isinstance(allocator, FreeKVTokenAllocator):
        runtime.close()
        raise FreeKVStartupError(
            "--kv-offload freekv: the KV allocator hook did not run "
            f"(got {type(allocator).__name__})"
        )
    pool = model_runner.token_to_kv_pool
    runtime.attach_allocator(
        allocator,
        model_runner.req_to_token_pool.req_to_token,
        lambda layer: (pool.get_key_buffer(layer), pool.get_value_buffer(layer)),
    )
    rt_mod.install(runtime)
    return runtime


class FreeKVBackendMixin:
    """What both FreeKV attention backends add to their SGLang base: the batch's adoption by
    the runtime and the offload after each layer's K/V write (the base class provides the
    pools, the subclass the runtime)."""

    freekv: rt_mod.FreeKVRuntime
    token_to_kv_pool: Any
    req_to_token_pool: Any

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
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)  # type: ignore[misc]
        if save_kv_cache and not layer.is_cross_attention:
            self._offload(layer.layer_id)
        return o


class FreeKVTorchNativeBackend(FreeKVBackendMixin, TorchNativeAttnBackend):  # type: ignore[misc]
    """SGLang's torch-native backend whose decode attends FreeKV's budget (see module doc)."""

    def __init__(self, model_runner: Any, settings: FreeKVSettings) -> None:
        super().__init__(model_runner)
        self.freekv = attach_runtime(model_runner, settings)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._adopt_batch(forward_batch)

    def forward_decode(
        self, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any, save_kv_cache: bool = True
    ) -> Any:
        sliding = layer.sliding_window_size is not None and layer.sliding_window_size > -1
        if layer.is_cross_attention or sliding:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = torch.empty_like(q)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
            self._offload(layer.layer_id)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        rows = forward_batch.req_pool_indices
        seq_lens = forward_batch.seq_lens
        use_gqa = layer.tp_q_head_num != layer.tp_k_head_num
        if self.freekv.cfg.is_dense_layer(layer.layer_id):
            self._dense_layer(q_, o_, k_cache, v_cache, req_to_token, rows, seq_lens, layer)
            return o
        sparse = self.freekv.batch_sparse()
        if len(sparse) != seq_lens.shape[0]:
            raise RuntimeError("FreeKV decode of a batch the runtime did not adopt")
        if not any(sparse):
            self._dense(q_, o_, k_cache, v_cache, req_to_token, rows, seq_lens, layer, use_gqa)
            return o
        dense_idx, sp = self.freekv.batch_split(seq_lens.device)
        if dense_idx.numel():
            o_dense = torch.empty_like(o_[dense_idx])
            self._dense(
                q_[dense_idx],
                o_dense,
                k_cache,
                v_cache,
                req_to_token,
                rows[dense_idx],
                seq_lens[dense_idx],
                layer,
                use_gqa,
            )
            o_[dense_idx] = o_dense
        scale = layer.scaling if layer.scaling is not None else layer.qk_head_dim**-0.5
        o_[sp] = self.freekv.sparse_decode(
            layer.layer_id,
            q_[sp],
            rows[sp].to(torch.int64),
            seq_lens[sp].to(torch.int64),
            k_cache,
            v_cache,
            req_to_token,
            scale,
        )
        return o

    def _dense_layer(
        self,
        q_: Any,
        o_: Any,
        k_cache: Any,
        v_cache: Any,
        req_to_token: Any,
        rows: Any,
        seq_lens: Any,
        layer: Any,
    ) -> None:
        """A dense layer: every request attends to its whole context. Requests whose offloaded
        pages gave their device slots back read those pages from the dense-layer store."""
        use_gqa = layer.tp_q_head_num != layer.tp_k_head_num
        row_list = rows.tolist()
        far = [i for i, r in enumerate(row_list) if self.freekv.has_reclaimed(int(r))]
        if not far:
            self._dense(q_, o_, k_cache, v_cache, req_to_token, rows, seq_lens, layer, use_gqa)
            return
        far_set = set(far)
        near = [i for i in range(len(row_list)) if i not in far_set]
        if near:
            idx = torch.tensor(near, device=rows.device)
            o_near = torch.empty_like(o_[idx])
            self._dense(
                q_[idx],
                o_near,
                k_cache,
                v_cache,
                req_to_token,
                rows[idx],
                seq_lens[idx],
                layer,
                use_gqa,
            )
            o_[idx] = o_near
        for i in far:
            n = int(seq_lens[i])
            k, v = self.freekv.full_kv(
                layer.layer_id, int(row_list[i]), n, k_cache, v_cache, req_to_token
            )
            # SGLang's own decode attention over the gathered K/V (identity slot table).
            table = torch.arange(n, device=k.device).view(1, n)
            zero = torch.zeros(1, dtype=torch.int64, device=k.device)
            self._dense(
                q_[i : i + 1],
                o_[i : i + 1],
                k,
                v,
                table,
                zero,
                seq_lens[i : i + 1],
                layer,
                use_gqa,
            )

    def _dense(
        self,
        q_: Any,
        o_: Any,
        k_cache: Any,
        v_cache: Any,
        req_to_token: Any,
        rows: Any,
        seq_lens: Any,
        layer: Any,
        use_gqa: bool,
    ) -> None:
        """SGLang's own decode attention (``TorchNativeAttnBackend``) for these requests."""
        self._run_sdpa_forward_decode(
            q_,
            o_,
            k_cache,
            v_cache,
            req_to_token,
            rows,
            seq_lens,
            None,
            scaling=layer.scaling,
            enable_gqa=use_gqa,
            causal=False,
            is_cross_attn=False,
            sliding_window_size=None,
        )
