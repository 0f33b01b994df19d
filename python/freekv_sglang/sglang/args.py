"""``--kv-offload`` and the ``--freekv-*`` server flags in SGLang, and the start-up checks.

The settings themselves (flags, ``FREEKV_*`` variables, Engine keywords, defaults, value
checks) are one table, :data:`freekv_sglang.settings.SETTINGS`; this module connects it to
SGLang's start-up. Who calls what:

- the launcher process (before SGLang parses arguments) gets :func:`add_cli_args_after` as an
  AFTER hook on ``ServerArgs.add_cli_args``, and :func:`from_cli_args_after` as an AFTER hook on
  ``ServerArgs.from_cli_args``. The latter validates the flags and exports them as ``FREEKV_*``
  environment variables, the one channel every later process reads: scheduler subprocesses
  inherit the environment, so their plugin load already knows whether FreeKV is on (and
  registers its per-step hooks only then);
- ``sglang.Engine(kv_offload="freekv", freekv_budget=...)`` has no argument parser: the AROUND
  hook :func:`engine_init_around` pops those keywords, exports them for the duration of
  ``Engine.__init__`` (which spawns the scheduler) and restores the environment afterwards.
  Setting ``FREEKV_KV_OFFLOAD=freekv`` (and ``FREEKV_*``) in the environment works as well;
- the resolution hook :func:`resolution_hook` (wrapping SGLang's
  ``handle_offload_compatibility`` step) refuses, with the flag named, every combination FreeKV
  does not support, and every model it cannot serve (:func:`check_model`: multi-head latent
  attention, read from the model's config before any weight is loaded), on a GPU every value
  the CUDA kernels do not take (:mod:`freekv_sglang.kernel_limits`), and sets the defaults
  FreeKV needs through SGLang's ``declare_resolution``.

The hooks are attached from :data:`freekv_sglang.sglang.lifecycle.HOOKS`. Nothing here keeps
state besides ``os.environ`` and the launcher mark; all functions are cheap and run at start-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

from freekv_sglang.kernel_limits import KV_CACHE_DTYPE, check_kernel_limits
from freekv_sglang.model_config import (
    check_model_config,
    check_model_kernel_limits,
    host_page_bytes,
)
from freekv_sglang.settings import (
    SETTINGS,
    FreeKVSettings,
    FreeKVStartupError,
    check_host_pool_pages,
    export_env,
    override,
    settings_from_env,
)
from freekv_sglang.sglang.hooks import verify_hooks

__all__ = [
    "FreeKVSettings",
    "FreeKVStartupError",
    "add_cli_args",
    "check_model",
    "check_server_args",
    "engine_init_around",
    "from_cli_args_after",
    "resolution_hook",
    "settings_from_env",
    "settings_from_namespace",
]

#: Attention backends the FreeKV adapter can drive: FlashInfer on a GPU, torch_native on a CPU.
SUPPORTED_ATTENTION_BACKENDS: tuple[str, ...] = ("torch_native", "flashinfer")
#: The attention backend FreeKV picks per device when ``--attention-backend`` is not given.
DEFAULT_ATTENTION_BACKEND: dict[str, str] = {"cuda": "flashinfer", "cpu": "torch_native"}
#: SGLang's decode-graph field: FreeKV's decode runs under SGLang's CUDA-graph runner on a GPU
#: (:mod:`freekv_sglang.runtime.graph_decode`); SGLang's CPU graph runner is not supported.
CUDA_GRAPH_DECODE = ("--cuda-graph-backend-decode", "cuda_graph_backend_decode")
#: SGLang's prefill-graph field, which FreeKV turns off: the offload after each layer's
#: prefill is host work.
CUDA_GRAPH_PREFILL = ("--cuda-graph-backend-prefill", "cuda_graph_backend_prefill")
#: The program name SGLang's launcher gives its argument parser (argparse's errors start with
#: it; so do FreeKV's refusals in the launcher).
LAUNCHER_PROG = "sglang serve"
#: Set in the launcher process once it parsed the command line (:func:`from_cli_args_after`):
#: a refusal there is printed as one line and exits with status 2, as argparse does, instead
#: of a traceback. ``sglang.Engine`` never sets it and gets the exception.
_in_launcher = False


def refuse(error: FreeKVStartupError) -> NoReturn:
    """End the launcher with ``error`` on one line of standard error and exit status 2."""
    print(f"{LAUNCHER_PROG}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--kv-offload`` and the ``--freekv-*`` options, one per row of the table.

    Options left out keep the value of their ``FREEKV_*`` variable, else the default shown.
    """
    group = parser.add_argument_group("FreeKV KV-cache offload")
    group.argument_default = argparse.SUPPRESS
    for row in SETTINGS:
        group.add_argument(
            row.flag,
            dest=row.keyword,
            type=row.parse,
            choices=None if row.choices is None else list(row.choices),
            help=row.help_text(),
        )


def settings_from_namespace(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> FreeKVSettings:
    """The environment's settings overridden by the flags given on the command line."""
    given = {row.name: getattr(args, row.keyword) for row in SETTINGS if hasattr(args, row.keyword)}
    return override(settings_from_env(environ), given)


# --- hooks (rows of freekv_sglang.sglang.lifecycle.HOOKS) -------------------------------------


def add_cli_args_after(result: Any, parser: argparse.ArgumentParser) -> Any:
    """AFTER hook on ``ServerArgs.add_cli_args``."""
    add_cli_args(parser)
    return result


def from_cli_args_after(result: Any, cls: Any, args: argparse.Namespace) -> Any:
    """AFTER hook on ``ServerArgs.from_cli_args`` (the launcher, once it parsed the command
    line): validate and export the FreeKV flags. A bad value ends the launcher with one line
    naming the flag and exit status 2; so do the later refusals of :func:`resolution_hook`
    in this process, which all come before the model loads."""
    global _in_launcher
    _in_launcher = True
    try:
        export_env(settings_from_namespace(args))
    except FreeKVStartupError as e:
        refuse(e)
    return result


_BY_KEYWORD = {row.keyword: row.name for row in SETTINGS}


def engine_init_around(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on ``sglang.Engine.__init__``: accept ``kv_offload=`` and ``freekv_*=``."""
    ours = {_BY_KEYWORD[k]: kwargs.pop(k) for k in list(kwargs) if k in _BY_KEYWORD}
    if not ours:
        return original(self, *args, **kwargs)
    s = override(settings_from_env(), ours)
    saved = {k: os.environ.get(k) for k in s.to_env()}
    export_env(s)
    try:
        return original(self, *args, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _field(server_args: Any, name: str) -> Any:
    return getattr(server_args, name, None)


def resolved_device(server_args: Any) -> str:
    """``--device`` as SGLang will resolve it: the flag, else ``cuda`` when a GPU is visible."""
    device = _field(server_args, "device")
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: Parallel modes FreeKV refuses, as (flag, server-args field): each would split one
#: request's attention or KV across ranks (attention DP, context parallelism) or its layers
#: across processes (pipeline), which one runtime per rank does not model.
UNSUPPORTED_PARALLELISM: tuple[tuple[str, str], ...] = (
    # SGLang 0.5.23 resolves the deprecated --enable-dp-attention into attn_dp_size before
    # this check runs; the flag's own field is kept for releases that do not.
    ("--attn-dp-size (--enable-dp-attention)", "attn_dp_size"),
    ("--enable-dp-attention", "enable_dp_attention"),
    ("--attn-cp-size", "attn_cp_size"),
    ("--dcp-size", "dcp_size"),
    ("--enable-pdmux", "enable_pdmux"),
)


def check_server_args(server_args: Any, s: FreeKVSettings) -> None:
    """Refuse every combination FreeKV does not support (names the flags)."""
    if not s.enabled:
        return
    spec = _field(server_args, "speculative_algorithm")
    if spec:
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support speculative decoding "
            f"(--speculative-algorithm {spec})"
        )
    dllm = _field(server_args, "dllm_algorithm")
    if dllm:
        raise FreeKVStartupError(
            f"--kv-offload freekv decodes one token per request and step; --dllm-algorithm "
            f"{dllm} is not supported"
        )
    if os.environ.get("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "").lower() in ("1", "true"):
        raise FreeKVStartupError(
            "--kv-offload freekv does host work before every decode step (adoption, offload, "
            "budget regions), which SGLANG_ENABLE_METADATA_GLUE_GRAPH would capture in a "
            "graph: unset it"
        )
    pp = _field(server_args, "pp_size") or 1
    if pp > 1:
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support pipeline parallelism (--pp-size {pp})"
        )
    # Tensor and data parallelism run one FreeKV runtime per rank (docs: "Parallelism");
    # the modes that split one request's attention across ranks do not.
    for flag, name in UNSUPPORTED_PARALLELISM:
        value = _field(server_args, name)
        if value is True or (type(value) is int and value > 1):
            raise FreeKVStartupError(
                f"--kv-offload freekv does not support {flag} ({name}={value}); tensor "
                f"parallelism (--tp-size) and data parallelism (--dp-size) are supported"
            )
    if _field(server_args, "enable_mixed_chunk"):
        raise FreeKVStartupError(
            "--kv-offload freekv does not support --enable-mixed-chunk (decode tokens would "
            "attend densely inside prefill batches)"
        )
    page = _field(server_args, "page_size")
    if page not in (None, 1):
        raise FreeKVStartupError(
            f"--kv-offload freekv needs SGLang's token-granular KV pool (--page-size 1), got "
            f"--page-size {page}; set FreeKV's own page with --freekv-page-size"
        )
    for flag, name in (
        ("--attention-backend", "attention_backend"),
        ("--decode-attention-backend", "decode_attention_backend"),
        ("--prefill-attention-backend", "prefill_attention_backend"),
    ):
        backend = _field(server_args, name)
        if backend is not None and backend not in SUPPORTED_ATTENTION_BACKENDS:
            raise FreeKVStartupError(
                f"--kv-offload freekv cannot drive {flag} {backend}; supported: "
                f"{', '.join(SUPPORTED_ATTENTION_BACKENDS)}"
            )
    kv_dtype = _field(server_args, "kv_cache_dtype")
    if kv_dtype is not None and not KV_CACHE_DTYPE.allows(kv_dtype):
        raise FreeKVStartupError(
            f"--kv-offload freekv keeps 16-bit (or the model's) keys and values; --kv-cache-dtype "
            f"{kv_dtype} is not supported (use {', '.join(KV_CACHE_DTYPE.values)})",
            flag=KV_CACHE_DTYPE.flag,
        )
    device = resolved_device(server_args)
    for flag, name in (
        ("--attention-backend", "attention_backend"),
        ("--decode-attention-backend", "decode_attention_backend"),
    ):
        if _field(server_args, name) == "flashinfer" and device != "cuda":
            raise FreeKVStartupError(
                f"--kv-offload freekv with {flag} flashinfer needs a GPU (--device cuda); on "
                f"--device {device} use torch_native"
            )
    flag, name = CUDA_GRAPH_PREFILL
    graphs = _field(server_args, name)
    if graphs not in (None, "disabled"):
        raise FreeKVStartupError(
            f"--kv-offload freekv offloads each layer's prefill from the host and cannot run "
            f"it in a CUDA graph: {flag} {graphs} (use disabled or leave it unset)"
        )
    flag, name = CUDA_GRAPH_DECODE
    graphs = _field(server_args, name)
    if device != "cuda" and graphs not in (None, "disabled"):
        raise FreeKVStartupError(
            f"--kv-offload freekv runs its decode under SGLang's CUDA-graph runner on "
            f"--device cuda only, not {flag} {graphs} on --device {device} (use disabled or "
            "leave it unset)"
        )
    if _field(server_args, "enable_hierarchical_cache"):
        raise FreeKVStartupError(
            "--kv-offload freekv and --enable-hierarchical-cache both offload the KV cache; use one"
        )


def check_kernel_settings(server_args: Any, s: FreeKVSettings) -> None:
    """On a GPU: ``--dtype`` and the ``--freekv-*`` values against the CUDA kernels' table,
    before the model's config is read."""
    dtype = _field(server_args, "dtype")
    cfg = s.retrieval_config()
    check_kernel_limits(
        dtype=None if dtype in (None, "auto") else dtype,
        page_size=cfg.page_size,
        selected_pages=cfg.num_selected_pages,
        budget=s.budget,
    )


def check_model(
    server_args: Any, settings: FreeKVSettings | None = None, device: str | None = None
) -> None:
    """Read the model's config with ``transformers.AutoConfig`` (no weights) and check it;
    with ``settings``, also that its host pool fits the pool's page slots and, on ``device``
    ``cuda``, the CUDA kernels' limits (:func:`check_model_kernel_limits`).

    A config that cannot be read here is left to SGLang, which reports it when it loads the
    model."""
    model_path = _field(server_args, "model_path")
    if not model_path:
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            model_path,
            trust_remote_code=bool(_field(server_args, "trust_remote_code")),
            revision=_field(server_args, "revision"),
        )
    except Exception as e:  # not a readable HF config (GGUF file, offline hub id, ...)
        logging.getLogger(__name__).debug("FreeKV model check skipped: %s", e)
        return
    check_model_config(config, str(model_path))
    if settings is not None and settings.host_pool_gb is not None:
        page_bytes = host_page_bytes(config, settings.page_size, _field(server_args, "dtype"))
        if page_bytes is not None:
            check_host_pool_pages(settings.host_pool_gb, page_bytes)
    if settings is not None and device == "cuda":
        check_model_kernel_limits(config, str(model_path), settings, _field(server_args, "dtype"))


def resolution_hook(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Wrapper of SGLang's ``handle_offload_compatibility`` resolution step. In the launcher a
    refusal ends the process with one line (:func:`refuse`); elsewhere it raises."""
    try:
        _resolve(server_args, previous)
    except FreeKVStartupError as e:
        if _in_launcher:
            refuse(e)
        raise


def _resolve(server_args: Any, previous: Callable[[Any], None]) -> None:
    previous(server_args)
    s = settings_from_env()
    view = resolving_view(server_args)
    if not s.enabled:
        if getattr(view, "radix_cache_backend", None) == "freekv":
            raise FreeKVStartupError(
                "--radix-cache-backend freekv keeps prefixes in FreeKV's host pool: it needs "
                "--kv-offload freekv"
            )
        return
    check_server_args(view, s)
    device = resolved_device(view)
    if device == "cuda":
        check_kernel_settings(view, s)
    check_model(view, s, device)
    defaults: dict[str, Any] = {}
    if getattr(view, "attention_backend", None) is None and device in DEFAULT_ATTENTION_BACKEND:
        defaults["attention_backend"] = DEFAULT_ATTENTION_BACKEND[device]
    if device == "cuda" and getattr(view, CUDA_GRAPH_PREFILL[1], None) is None:
        defaults[CUDA_GRAPH_PREFILL[1]] = "disabled"
    if defaults:
        declare_resolution(server_args, "freekv", **defaults)
    if not getattr(view, "disable_radix_cache", True):
        # FreeKV hands the device slots of offloaded pages back to SGLang's allocator, so a
        # device-slot radix tree cannot keep prefixes: FreeKV's own tree keeps them as host
        # pages (freekv_sglang.sglang.prefix_cache).
        backend = getattr(view, "radix_cache_backend", None)
        if backend not in (None, "freekv"):
            raise FreeKVStartupError(
                f"--kv-offload freekv keeps prefixes in its host pool; --radix-cache-backend "
                f"{backend!r} cannot be combined with it (use freekv, leave it unset, or pass "
                "--disable-radix-cache)"
            )
        if backend is None:
            declare_resolution(server_args, "freekv", radix_cache_backend="freekv")
    verify_hooks()
