"""Every SGLang hook of the adapter in one table, and the hooks that connect SGLang's engine
to the FreeKV runtime.

:data:`HOOKS` lists each hook (SGLang 0.5.23): target, kind, function and when it attaches.
:func:`register` (called by :func:`freekv_sglang.sglang.plugin.register`, once per process)
registers the rows that apply to this process, and
:func:`~freekv_sglang.sglang.hooks.verify_hooks` checks at start-up that each of them attached.
The start-up hooks attach always (they only add flags and read ``--kv-offload`` at call time);
the per-step hooks only when ``FREEKV_KV_OFFLOAD=freekv`` is in this process's environment, so
with ``--kv-offload none`` no FreeKV code runs per step.

Start-up and per-request hooks (always):

- ``ServerArgs.add_cli_args`` / ``ServerArgs.from_cli_args`` (AFTER; launcher), the
  ``sglang.Engine.__init__`` keywords (AROUND) and the ``handle_offload_compatibility``
  resolution step: the flags and their checks (:mod:`freekv_sglang.sglang.args`);
- ``TokenizerManager._validate_one_request`` (BEFORE; HTTP process, each request): with
  FreeKV on, a request the scheduler would die on gets a 400 instead of reaching the scheduler
  (:mod:`freekv_sglang.sglang.request_checks`);
- ``RotaryEmbedding.__init__`` (AROUND; model construction), only on a host without CUDA and
  vLLM: the pure-torch rotary kernel (:mod:`freekv_sglang.sglang.cpu_support`);
- ``parallel_state.init_model_parallel_group`` (AROUND; each rank's process-group setup), only
  on a host without CUDA: gloo groups without a NCCL communicator, so ``--tp N --device cpu``
  starts (:mod:`freekv_sglang.sglang.cpu_support`).

Per-step hooks (with FreeKV on), all called on the scheduler thread:

- ``..._build_full_attention_backend_from_str`` (AROUND; once, when the model runner builds
  its attention backend): :func:`build_backend_around` builds FreeKV's backend for
  ``flashinfer`` or ``torch_native`` and refuses any other with its flag named;
- ``decode_cuda_graph_runner.build_replay_fb_view`` (AROUND; before each decode graph
  replay): the replay view carries the batch's request rows on the host
  (:func:`replay_view_around`), so FreeKV's host part
  of a replay reads no device value;
- ``KVCacheConfigurator._build_token_to_kv_pool_allocator`` (AROUND; once, when the model
  runner builds its pools): SGLang's token allocator becomes
  :class:`~freekv_sglang.sglang.memory.FreeKVTokenAllocator` (reclaimed slots, host bound);
- ``sglang.srt.mem_cache.common.release_kv_cache`` (BEFORE; finish, abort and retraction all
  release through it): frees the request's host pages, budget slots and state. It runs before
  SGLang frees the row, while ``req.kv.req_pool_idx`` still names it;
- ``SchedulerMetricsReporter.report_decode_stats`` (AFTER; SGLang's periodic decode log line):
  logs the FreeKV figures next to it and updates the Prometheus gauges
  (:mod:`freekv_sglang.metrics`);
- ``Scheduler.get_new_batch_prefill`` (BEFORE; each scheduling round): after FreeKV
  reclaimed device slots, clears the running batch's "full" mark so that SGLang's admission
  looks at the freed capacity;
- ``SchedulerBatchResultProcessor.process_batch_result_{prefill,decode}`` (BEFORE; every
  batch result): a request whose offload or recall failed
  (:meth:`~freekv_sglang.runtime.FreeKVRuntime.failures`) finishes with an abort that
  carries the message, before its token is used; under tensor parallelism the failures of
  every rank are agreed first (:func:`freekv_sglang.sglang.ranks.agree_failures`), so a
  request that failed on one rank aborts on all;
- ``SchedulerInternalStateController.get_internal_state`` (AFTER; a ``/server_info`` request):
  adds the runtime's counters under ``"freekv"`` to the scheduler's internal state, so clients
  and tests read the server's own figures (``internal_states[0]["freekv"]``), with every
  tensor-parallel rank's under ``"ranks"``.

:func:`register` also makes ``--radix-cache-backend freekv`` known to SGLang
(:mod:`freekv_sglang.sglang.prefix_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT

from freekv_sglang import metrics
from freekv_sglang import runtime as rt_mod
from freekv_sglang.sglang import args as args_mod
from freekv_sglang.sglang import cpu_support, memory, prefix_cache, ranks, request_checks
from freekv_sglang.sglang.hooks import Hook, Kind, When, attach, verify_hooks

logger = logging.getLogger(__name__)


def replay_view_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on SGLang's ``build_replay_fb_view`` (scheduler thread, before each decode
    graph replay): the view gets the batch's request rows on the host, padded as SGLang pads
    its device copy (row 0), when the batch has them. Without them the host part of a replay
    (``FreeKVBackendMixin.init_forward_metadata_out_graph``) would read the rows from the
    device, waiting for the previous step's graph and losing the scheduler's overlap."""
    view = original(*args, **kwargs)
    batch = kwargs.get("forward_batch", args[0] if args else None)
    rows = getattr(batch, "req_pool_indices_cpu", None)
    if rows is not None and getattr(view, "req_pool_indices_cpu", None) is None:
        bs = int(view.batch_size)
        padded = torch.zeros(bs, dtype=rows.dtype)
        padded[: min(bs, rows.shape[0])] = rows[:bs]
        view.req_pool_indices_cpu = padded
    return view


def build_backend_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on the attention-backend factory. The backends are imported here, on the
    scheduler, once FreeKV is on (the FlashInfer one loads FlashInfer)."""
    settings = args_mod.settings_from_env()
    if not settings.enabled:
        return original(*args, **kwargs)
    backend_str = kwargs.get("backend_str", args[1] if len(args) > 1 else None)
    model_runner = kwargs.get("model_runner", args[0] if args else None)
    if backend_str not in args_mod.SUPPORTED_ATTENTION_BACKENDS:
        raise args_mod.FreeKVStartupError(
            f"--kv-offload freekv cannot drive --attention-backend {backend_str}; supported: "
            f"{', '.join(args_mod.SUPPORTED_ATTENTION_BACKENDS)}"
        )
    verify_hooks()
    if "init_new_workspace" in kwargs and model_runner is not None:
        model_runner.init_new_workspace = kwargs["init_new_workspace"]
    if backend_str == "flashinfer":
        from freekv_sglang.sglang.flashinfer_backend import FreeKVFlashInferBackend

        return FreeKVFlashInferBackend(
            model_runner,
            settings,
            init_new_workspace=getattr(model_runner, "init_new_workspace", False),
        )
    from freekv_sglang.sglang.attention_backend import FreeKVTorchNativeBackend

    return FreeKVTorchNativeBackend(model_runner, settings)


def release_before(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on ``release_kv_cache(req, tree_cache, *, checkpoint)``: a finished request
    first leaves its full pages to the prefix cache (when SGLang checkpoints it), then the
    runtime frees what the row held."""
    runtime = rt_mod.current()
    req = kwargs.get("req", args[0] if args else None)
    if runtime is None or req is None:
        return None
    tree_cache = kwargs.get("tree_cache", args[1] if len(args) > 1 else None)
    row = getattr(getattr(req, "kv", None), "req_pool_idx", None)
    if row is not None:
        if kwargs.get("checkpoint", False):
            prefix_cache.publish(tree_cache, req)
        runtime.release(int(row))
    return None


def decode_stats_after(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on SGLang's decode log line: log and export the FreeKV figures."""
    runtime = rt_mod.current()
    if runtime is None:
        return result
    reporter = args[0] if args else None
    interval = getattr(reporter, "decode_log_interval", 1) or 1
    if getattr(reporter, "forward_ct_decode", 0) % interval != 0:
        return result  # SGLang logs only every decode_log_interval steps; so do we
    s = runtime.stats()
    info = ranks.rank_info()
    line = metrics.format_line(s)
    if info.tp_size > 1 or info.dp_rank:
        line += f" [tp {info.tp_rank}, dp {info.dp_rank}]"
    logger.info(line)
    metrics.export(s, info.labels())
    return result


def admission_before(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on ``Scheduler.get_new_batch_prefill(running_batch)``.

    SGLang marks the running batch full when a prefill found no memory and clears the mark
    only when a request leaves. FreeKV also frees memory when it reclaims device slots, so
    the mark is cleared then too (as SGLang's HiSparse does after its own reclaim)."""
    runtime = rt_mod.current()
    if runtime is None or not runtime.reclaim.take_event():
        return None
    batch = kwargs.get("running_batch", args[1] if len(args) > 1 else None)
    if batch is not None and getattr(batch, "batch_is_full", False):
        batch.batch_is_full = False
    return None


def abort_failed_before(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on SGLang's batch-result processing (prefill and decode): a request whose
    KV offload or recall failed finishes with an abort carrying the message (HTTP 500), so its
    client gets an error instead of tokens computed from incomplete KV."""
    runtime = rt_mod.current()
    if runtime is None:
        return None
    local = runtime.failures()
    # A collective on every tensor-parallel rank, every batch: a request that failed on one
    # rank is aborted on all of them (freekv_sglang.sglang.ranks).
    failures = ranks.agree_failures(local)
    if not failures:
        return None
    for rid in failures.keys() - local.keys():
        runtime.mark_failed(rid, failures[rid])
    batch = kwargs.get("batch", args[1] if len(args) > 1 else None)
    for req in getattr(batch, "reqs", None) or []:
        message = failures.get(req.rid)
        if message is None:
            continue
        runtime.clear_failure(req.rid)
        if not req.finished():
            req.to_finish = FINISH_ABORT(
                message, HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError"
            )
    return None


def internal_state_after(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on the scheduler's internal-state readback: add the FreeKV counters."""
    runtime = rt_mod.current()
    state = getattr(result, "internal_state", None)
    if runtime is not None and isinstance(state, dict):
        info = ranks.rank_info()
        mine = {
            **runtime.stats(),
            "pools_consistent": runtime.check_pools(),
            "tp_rank": info.tp_rank,
            "tp_size": info.tp_size,
            "dp_rank": info.dp_rank,
        }
        # Every tensor-parallel rank answers; SGLang returns the first rank's state, so that
        # one carries the figures of all of them (one host pool per rank).
        every = ranks.gather(mine)
        state["freekv"] = mine if every is None else {**mine, "ranks": every}
    return result


#: Every SGLang hook of the adapter (see the module docstring): target, kind, function, when.
HOOKS: tuple[Hook, ...] = (
    Hook(
        "sglang.srt.server_args.ServerArgs.add_cli_args",
        Kind.AFTER,
        args_mod.add_cli_args_after,
        When.ALWAYS,
    ),
    Hook(
        "sglang.srt.server_args.ServerArgs.from_cli_args",
        Kind.AFTER,
        args_mod.from_cli_args_after,
        When.ALWAYS,
    ),
    Hook(
        "sglang.srt.entrypoints.engine.Engine.__init__",
        Kind.AROUND,
        args_mod.engine_init_around,
        When.ALWAYS,
    ),
    Hook(
        "handle_offload_compatibility",
        Kind.RESOLUTION,
        args_mod.resolution_hook,
        When.ALWAYS,
    ),
    Hook(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        Kind.BEFORE,
        request_checks.validate_before,
        When.ALWAYS,
    ),
    Hook(
        "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__",
        Kind.AROUND,
        cpu_support.rotary_init_around,
        When.ROTARY_FALLBACK,
    ),
    Hook(
        "sglang.srt.distributed.parallel_state.init_model_parallel_group",
        Kind.AROUND,
        cpu_support.tp_group_around,
        When.NO_CUDA,
    ),
    Hook(
        "sglang.srt.model_executor.model_runner_components.attention_backend_setup."
        "_build_full_attention_backend_from_str",
        Kind.AROUND,
        build_backend_around,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view",
        Kind.AROUND,
        replay_view_around,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes",
        Kind.AROUND,
        memory.reserve_around,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool",
        Kind.AROUND,
        memory.pool_around,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator."
        "_build_token_to_kv_pool_allocator",
        Kind.AROUND,
        memory.build_allocator_around,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.mem_cache.common.release_kv_cache",
        Kind.BEFORE,
        release_before,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.metrics_reporter."
        "SchedulerMetricsReporter.report_decode_stats",
        Kind.AFTER,
        decode_stats_after,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.internal_state."
        "SchedulerInternalStateController.get_internal_state",
        Kind.AFTER,
        internal_state_after,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill",
        Kind.BEFORE,
        admission_before,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.batch_result_processor."
        "SchedulerBatchResultProcessor.process_batch_result_decode",
        Kind.BEFORE,
        abort_failed_before,
        When.FREEKV,
    ),
    Hook(
        "sglang.srt.managers.scheduler_components.batch_result_processor."
        "SchedulerBatchResultProcessor.process_batch_result_prefill",
        Kind.BEFORE,
        abort_failed_before,
        When.FREEKV,
    ),
)


def active_conditions() -> set[When]:
    """Which :class:`~freekv_sglang.sglang.hooks.When` hold in this process."""
    active = {When.ALWAYS}
    if args_mod.settings_from_env().enabled:
        active.add(When.FREEKV)
    if cpu_support.needs_rotary_fallback():
        active.add(When.ROTARY_FALLBACK)
    if cpu_support.needs_gloo_tp_groups():
        active.add(When.NO_CUDA)
    return active


def register(registry: Any) -> list[Hook]:
    """Register the rows of :data:`HOOKS` that apply to this process with ``registry``
    (SGLang's ``HookRegistry``) and the ``freekv`` radix-cache backend; returns the rows."""
    prefix_cache.register_backend()
    active = active_conditions()
    if When.ROTARY_FALLBACK in active:
        logger.info("freekv: no CUDA device; SGLang's rotary layer gets the pure-torch kernel")
    return attach(HOOKS, active, registry)
