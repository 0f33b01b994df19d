"""Hooks that connect SGLang's engine to the FreeKV runtime, and their registration.

Targets (SGLang 0.5.23), all called on the scheduler thread:

- ``..._build_full_attention_backend_from_str`` (AROUND; once, when the model runner builds
  its attention backend): with FreeKV on, the ``torch_native`` backend becomes
  :class:`~freekv_sglang.sglang.attention_backend.FreeKVTorchNativeBackend`; any other backend
  is refused with its flag named;
- ``KVCacheConfigurator._build_token_to_kv_pool_allocator`` (AROUND; once, when the model
  runner builds its pools): SGLang's token allocator becomes
  :class:`~freekv_sglang.sglang.memory.FreeKVTokenAllocator` (reclaimed slots, host bound);
- ``sglang.srt.mem_cache.common.release_kv_cache`` (BEFORE; finish, abort and retraction all
  release through it): frees the request's host pages, budget slots and state. It runs before
  SGLang frees the row, while ``req.kv.req_pool_idx`` still names it;
- ``SchedulerMetricsReporter.report_decode_stats`` (AFTER; SGLang's periodic decode log line):
  logs the FreeKV figures next to it and updates the Prometheus gauges
  (:mod:`freekv_sglang.sglang.metrics`);
- ``Scheduler.get_new_batch_prefill`` (BEFORE; each scheduling round): after FreeKV
  reclaimed device slots, clears the running batch's "full" mark so that SGLang's admission
  looks at the freed capacity;
- ``SchedulerBatchResultProcessor.process_batch_result_{prefill,decode}`` (BEFORE; every
  batch result): a request whose offload or recall failed
  (:meth:`~freekv_sglang.runtime.FreeKVRuntime.failures`) finishes with an abort that
  carries the message, before its token is used;
- ``SchedulerInternalStateController.get_internal_state`` (AFTER; a ``/server_info`` request):
  adds the runtime's counters under ``"freekv"`` to the scheduler's internal state, so clients
  and tests read the server's own figures (``internal_states[0]["freekv"]``).

- ``TokenizerManager._validate_one_request`` (BEFORE; HTTP process, each request): with
  FreeKV on, a request the scheduler would die on (an empty prompt, token ids outside the
  vocabulary, oversized top logprobs, ``logprob_start_len`` below -1) gets a 400 instead of
  reaching the scheduler (:mod:`freekv_sglang.sglang.request_checks`).

The CLI, Engine and resolution hooks live in :mod:`freekv_sglang.sglang.args`. Only
:func:`register` decides what attaches: the startup hooks always (they only add flags), the
per-step hooks only when ``FREEKV_KV_OFFLOAD=freekv`` is in this process's environment, so with
``--kv-offload none`` no FreeKV code runs per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from freekv_sglang import runtime as rt_mod
from freekv_sglang.sglang import args as args_mod

logger = logging.getLogger(__name__)

BACKEND_TARGET = (
    "sglang.srt.model_executor.model_runner_components.attention_backend_setup."
    "_build_full_attention_backend_from_str"
)
RELEASE_TARGET = "sglang.srt.mem_cache.common.release_kv_cache"
DECODE_STATS_TARGET = (
    "sglang.srt.managers.scheduler_components.metrics_reporter."
    "SchedulerMetricsReporter.report_decode_stats"
)
ALLOCATOR_TARGET = (
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator."
    "_build_token_to_kv_pool_allocator"
)
ADMISSION_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"
RESULT_DECODE_TARGET = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_decode"
)
RESULT_PREFILL_TARGET = (
    "sglang.srt.managers.scheduler_components.batch_result_processor."
    "SchedulerBatchResultProcessor.process_batch_result_prefill"
)
INTERNAL_STATE_TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController.get_internal_state"
)
VALIDATE_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
ADD_CLI_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_TARGET = "sglang.srt.server_args.ServerArgs.from_cli_args"
ENGINE_INIT_TARGET = "sglang.srt.entrypoints.engine.Engine.__init__"
RESOLUTION_STEP = "handle_offload_compatibility"

_resolution_registered = False  # SGLang's resolution-hook list is global: register once


def build_backend_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on the attention-backend factory."""
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
    from freekv_sglang.sglang.plugin import verify_hooks

    verify_hooks()
    if "init_new_workspace" in kwargs:
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


def _allocator_around(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from freekv_sglang.sglang.memory import build_allocator_around

    return build_allocator_around(original, *args, **kwargs)


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
            from freekv_sglang.sglang.prefix_cache import publish

            publish(tree_cache, req)
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
    from freekv_sglang.sglang import metrics

    s = runtime.stats()
    logger.info(metrics.format_line(s))
    metrics.export(s)
    return result


def admission_before(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on ``Scheduler.get_new_batch_prefill(running_batch)``.

    SGLang marks the running batch full when a prefill found no memory and clears the mark
    only when a request leaves. FreeKV also frees memory when it reclaims device slots, so
    the mark is cleared then too (as SGLang's HiSparse does after its own reclaim)."""
    runtime = rt_mod.current()
    if runtime is None or not runtime.take_reclaim_event():
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
    failures = runtime.failures()
    if not failures:
        return None
    batch = kwargs.get("batch", args[1] if len(args) > 1 else None)
    from http import HTTPStatus

    from sglang.srt.managers.schedule_batch import FINISH_ABORT

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


def validate_before(*args: Any, **kwargs: Any) -> None:
    """BEFORE hook on ``TokenizerManager._validate_one_request(obj, input_ids)`` (HTTP
    process, per request). With FreeKV on, the requests SGLang 0.5.23 lets through but its
    scheduler dies on (an empty prompt, out-of-vocabulary ids, oversized top logprobs, a bad
    ``logprob_start_len``: :mod:`freekv_sglang.sglang.request_checks`) get a 400. Registered
    always (the launcher loads plugins before it parses ``--kv-offload``), it reads the
    setting at call time and does nothing with ``none``."""
    if not args_mod.settings_from_env().enabled:
        return None
    from freekv_sglang.sglang.request_checks import check_request

    manager = kwargs.get("self", args[0] if args else None)
    obj = kwargs.get("obj", args[1] if len(args) > 1 else None)
    input_ids = kwargs.get("input_ids", args[2] if len(args) > 2 else None)
    vocab = getattr(getattr(manager, "model_config", None), "vocab_size", None)
    check_request(obj, input_ids, vocab if isinstance(vocab, int) else None)
    return None


def internal_state_after(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on the scheduler's internal-state readback: add the FreeKV counters."""
    runtime = rt_mod.current()
    state = getattr(result, "internal_state", None)
    if runtime is not None and isinstance(state, dict):
        state["freekv"] = {**runtime.stats(), "pools_consistent": runtime.check_pools()}
    return result


def register(registry: Any, hook_type: Any) -> list[str]:
    """Register the FreeKV hooks; returns the targets (for :func:`verify`)."""
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

    registry.register(ADD_CLI_TARGET, args_mod.add_cli_args_after, hook_type.AFTER)
    registry.register(FROM_CLI_TARGET, args_mod.from_cli_args_after, hook_type.AFTER)
    registry.register(ENGINE_INIT_TARGET, args_mod.engine_init_around, hook_type.AROUND)
    registry.register(VALIDATE_TARGET, validate_before, hook_type.BEFORE)
    global _resolution_registered
    if not _resolution_registered:
        register_resolution_hook(RESOLUTION_STEP)(args_mod.resolution_hook)
        _resolution_registered = True
    targets = [ADD_CLI_TARGET, FROM_CLI_TARGET, ENGINE_INIT_TARGET, VALIDATE_TARGET]
    from freekv_sglang.sglang.prefix_cache import register_backend

    register_backend()
    if args_mod.settings_from_env().enabled:
        registry.register(BACKEND_TARGET, build_backend_around, hook_type.AROUND)
        registry.register(ALLOCATOR_TARGET, _allocator_around, hook_type.AROUND)
        registry.register(RELEASE_TARGET, release_before, hook_type.BEFORE)
        registry.register(DECODE_STATS_TARGET, decode_stats_after, hook_type.AFTER)
        registry.register(INTERNAL_STATE_TARGET, internal_state_after, hook_type.AFTER)
        registry.register(ADMISSION_TARGET, admission_before, hook_type.BEFORE)
        registry.register(RESULT_DECODE_TARGET, abort_failed_before, hook_type.BEFORE)
        registry.register(RESULT_PREFILL_TARGET, abort_failed_before, hook_type.BEFORE)
        targets += [
            BACKEND_TARGET,
            ALLOCATOR_TARGET,
            RELEASE_TARGET,
            DECODE_STATS_TARGET,
            INTERNAL_STATE_TARGET,
            ADMISSION_TARGET,
            RESULT_DECODE_TARGET,
            RESULT_PREFILL_TARGET,
        ]
    return targets
