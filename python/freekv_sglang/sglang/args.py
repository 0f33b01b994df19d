"""``--kv-offload`` and the ``--freekv-*`` server flags, their environment twins, and start-up checks.

Who calls what:

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
  attention, read from the model's config before any weight is loaded).

Nothing here keeps state besides ``os.environ``; all functions are cheap and run at start-up.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn

from freekv_sglang.config import FreeKVConfig, FreeKVConfigError

OFFLOAD_MODES: tuple[str, ...] = ("none", "freekv")
RECALL_IMPLS: tuple[str, ...] = ("auto", "direct", "staged")
#: Page selection of the serving path: FreeKV's speculative retrieval, or the synchronous
#: baseline (select with the current query and recall before attention, as Quest/ArkVale).
SELECTIONS: tuple[str, ...] = ("speculative", "current")
#: Attention backends the FreeKV adapter can drive: FlashInfer on a GPU, torch_native on a CPU.
SUPPORTED_ATTENTION_BACKENDS: tuple[str, ...] = ("torch_native", "flashinfer")
#: The attention backend FreeKV picks per device when ``--attention-backend`` is not given.
DEFAULT_ATTENTION_BACKEND: dict[str, str] = {"cuda": "flashinfer", "cpu": "torch_native"}
#: CUDA-graph fields FreeKV turns off: its decode and offload do host-side work every step.
CUDA_GRAPH_FIELDS: tuple[tuple[str, str], ...] = (
    ("--cuda-graph-backend-decode", "cuda_graph_backend_decode"),
    ("--cuda-graph-backend-prefill", "cuda_graph_backend_prefill"),
)


class FreeKVStartupError(ValueError):
    """An unsupported FreeKV setting or combination; the message names the flag."""


#: The program name SGLang's launcher gives its argument parser (argparse's errors start with
#: it; so do FreeKV's refusals in the launcher).
LAUNCHER_PROG = "sglang serve"
#: Slots of the host page pool: the Rust pool's page index is 32 bits wide.
HOST_POOL_MAX_PAGES = 2**32
#: Set in the launcher process once it parsed the command line (:func:`from_cli_args_after`):
#: a refusal there is printed as one line and exits with status 2, as argparse does, instead
#: of a traceback. ``sglang.Engine`` never sets it and gets the exception.
_in_launcher = False


def refuse(error: FreeKVStartupError) -> NoReturn:
    """End the launcher with ``error`` on one line of standard error and exit status 2."""
    print(f"{LAUNCHER_PROG}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def host_memory_bytes() -> int | None:
    """Physical memory of this host (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class FreeKVSettings:
    """Every ``--freekv-*`` value; ``env`` is the matching ``FREEKV_*`` variable suffix."""

    kv_offload: str = "none"
    budget: int = 2048
    sink: int = 512
    window: int = 512
    page_size: int = 32
    tau: float | None = 0.8
    dense_layers: tuple[int, ...] = (0,)
    host_pool_gb: float | None = None
    conversion_threads: int | None = None
    sparse_requests: int | None = None
    recall_impl: str = "auto"
    selection: str = "speculative"

    @property
    def enabled(self) -> bool:
        return self.kv_offload == "freekv"

    def retrieval_config(self) -> FreeKVConfig:
        """The core's config; a bad value raises :class:`FreeKVStartupError` naming the flag."""
        try:
            return FreeKVConfig(
                page_size=self.page_size,
                sink_tokens=self.sink,
                window_tokens=self.window,
                budget_tokens=self.budget,
                tau=self.tau,
                dense_layers=self.dense_layers,
                selection=self.selection,  # type: ignore[arg-type]
            )
        except FreeKVConfigError as e:
            msg = str(e)
            for field_name, flag in _CONFIG_FLAGS.items():
                msg = msg.replace(field_name, flag)
            raise FreeKVStartupError(f"invalid FreeKV setting: {msg}") from None

    def to_env(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "dense_layers":
                s = ",".join(str(i) for i in v)
            elif f.name == "tau":
                s = "off" if v is None else repr(v)
            else:
                s = "" if v is None else str(v)
            out[_ENV_PREFIX + f.name.upper()] = s
        return out


_ENV_PREFIX = "FREEKV_"
_CONFIG_FLAGS = {
    "budget_tokens": "--freekv-budget",
    "sink_tokens": "--freekv-sink",
    "window_tokens": "--freekv-window",
    "page_size": "--freekv-page-size",
    "dense_layers": "--freekv-dense-layers",
    "tau": "--freekv-tau",
    "selection": "--freekv-selection",
}


def _parse_tau(s: str) -> float | None:
    if s.strip().lower() in ("off", "none", ""):
        return None
    return float(s)


def _parse_layers(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.replace(" ", "").split(",") if x)


def _parse_opt_float(s: str) -> float | None:
    return None if s in ("", "auto") else float(s)


def _parse_opt_int(s: str) -> int | None:
    return None if s in ("", "auto") else int(s)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "kv_offload": str,
    "budget": int,
    "sink": int,
    "window": int,
    "page_size": int,
    "tau": _parse_tau,
    "dense_layers": _parse_layers,
    "host_pool_gb": _parse_opt_float,
    "conversion_threads": _parse_opt_int,
    "sparse_requests": _parse_opt_int,
    "recall_impl": str,
    "selection": str,
}


def settings_from_env(environ: Mapping[str, str] | None = None) -> FreeKVSettings:
    """Settings from ``FREEKV_*`` variables (unset ones keep their defaults)."""
    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    for name, parse in _PARSERS.items():
        key = _ENV_PREFIX + name.upper()
        if key in env:
            try:
                kwargs[name] = parse(env[key])
            except ValueError as e:
                raise FreeKVStartupError(f"{key}={env[key]!r} is not valid: {e}") from None
    s = FreeKVSettings(**kwargs)
    check_settings(s)
    return s


def check_settings(s: FreeKVSettings) -> None:
    """Value checks that need no model or server context."""
    if s.kv_offload not in OFFLOAD_MODES:
        raise FreeKVStartupError(
            f"--kv-offload must be one of {OFFLOAD_MODES}, got {s.kv_offload!r}"
        )
    if s.recall_impl not in RECALL_IMPLS:
        raise FreeKVStartupError(
            f"--freekv-recall-impl must be one of {RECALL_IMPLS}, got {s.recall_impl!r}"
        )
    if s.selection not in SELECTIONS:
        raise FreeKVStartupError(
            f"--freekv-selection must be one of {SELECTIONS}, got {s.selection!r}"
        )
    if s.host_pool_gb is not None:
        check_host_pool_gb(s.host_pool_gb)
    if s.conversion_threads is not None and s.conversion_threads < 1:
        raise FreeKVStartupError(
            f"--freekv-conversion-threads must be at least 1, got {s.conversion_threads}"
        )
    if s.sparse_requests is not None and s.sparse_requests < 1:
        raise FreeKVStartupError(
            f"--freekv-sparse-requests must be at least 1, got {s.sparse_requests}"
        )
    if s.enabled:
        s.retrieval_config()


def check_host_pool_gb(gb: float, memory_bytes: int | None = None) -> None:
    """``--freekv-host-pool-gb``: a finite size above 0 that the host's memory can hold (the
    pool is pinned, so it must be resident). ``memory_bytes`` defaults to this host's."""
    memory = host_memory_bytes() if memory_bytes is None else memory_bytes
    limit = "" if memory is None else f" and at most this host's memory, {memory / 2**30:.1f} GiB"
    if not math.isfinite(gb) or gb <= 0 or (memory is not None and gb * 2**30 > memory):
        raise FreeKVStartupError(
            f"--freekv-host-pool-gb {gb:g}: the host pool size must be a number of GiB above 0"
            f"{limit}"
        )


def check_host_pool_pages(gb: float, page_bytes: int) -> None:
    """The pool of ``gb`` GiB must have at most :data:`HOST_POOL_MAX_PAGES` pages of
    ``page_bytes`` (every layer's K and V of ``--freekv-page-size`` tokens)."""
    pages = int(gb * 2**30) // page_bytes
    if pages > HOST_POOL_MAX_PAGES:
        most = HOST_POOL_MAX_PAGES * page_bytes / 2**30
        raise FreeKVStartupError(
            f"--freekv-host-pool-gb {gb:g}: {pages} host pages of {page_bytes} bytes exceed the "
            f"pool's {HOST_POOL_MAX_PAGES} page slots (at most {most:.1f} GiB for this model "
            "and --freekv-page-size)"
        )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--kv-offload`` and the ``--freekv-*`` options (SGLang-style help).

    Options left out keep the value of their ``FREEKV_*`` variable, else the default shown.
    """
    d = FreeKVSettings()
    g = parser.add_argument_group("FreeKV KV-cache offload")
    g.argument_default = argparse.SUPPRESS
    g.add_argument(
        "--kv-offload",
        type=str,
        choices=list(OFFLOAD_MODES),
        help="KV-cache offload mode. 'freekv' keeps the full KV cache in a host pool and a "
        "per-request budget of pages on the device, chosen by speculative retrieval.",
    )
    g.add_argument(
        "--freekv-budget",
        type=int,
        help="FreeKV token budget per request, layer and KV head (sink + selected + window). "
        f"A request whose context fits attends densely. Default: {d.budget}.",
    )
    g.add_argument(
        "--freekv-sink", type=int, help=f"FreeKV attention-sink tokens. Default: {d.sink}."
    )
    g.add_argument(
        "--freekv-window",
        type=int,
        help=f"FreeKV most-recent tokens attended. Default: {d.window}.",
    )
    g.add_argument(
        "--freekv-page-size", type=int, help=f"FreeKV tokens per page. Default: {d.page_size}."
    )
    g.add_argument(
        "--freekv-tau",
        type=_parse_tau,
        help="FreeKV correction threshold on the group-mean cosine of consecutive queries; "
        f"'off' disables correction. Default: {d.tau}.",
    )
    g.add_argument(
        "--freekv-dense-layers",
        type=_parse_layers,
        help="FreeKV layers that always attend densely, comma-separated ('' for none). "
        f"Default: {','.join(map(str, d.dense_layers))}.",
    )
    g.add_argument(
        "--freekv-host-pool-gb",
        type=_parse_opt_float,
        help="FreeKV host KV pool size in GiB (default: enough for --max-total-tokens).",
    )
    g.add_argument(
        "--freekv-conversion-threads",
        type=_parse_opt_int,
        help="Threads converting offloaded pages to the host layout (default: automatic).",
    )
    g.add_argument(
        "--freekv-sparse-requests",
        type=_parse_opt_int,
        help="FreeKV budget regions allocated on the device at start-up: how many requests "
        "over budget decode sparsely at once; others are held dense until one frees (default: "
        "the running-request limit, capped at 40%% of the device memory left after SGLang's "
        "pools; an eighth of available memory on CPU).",
    )
    g.add_argument(
        "--freekv-recall-impl",
        type=str,
        choices=list(RECALL_IMPLS),
        help="FreeKV recall path: device-driven 'direct', double-buffered 'staged', or 'auto'.",
    )
    g.add_argument(
        "--freekv-selection",
        type=str,
        choices=list(SELECTIONS),
        help="FreeKV page selection: 'speculative' (step t's query selects and recalls step "
        "t+1's pages off the critical path, with correction) or 'current' (the synchronous "
        f"baseline: select with this step's query and recall before attention). Default: "
        f"{d.selection}.",
    )


def _arg_name(name: str) -> str:
    return name if name == "kv_offload" else "freekv_" + name


def settings_from_namespace(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> FreeKVSettings:
    """The environment's settings overridden by the flags given on the command line."""
    base = settings_from_env(environ)
    kwargs = {f.name: getattr(base, f.name) for f in fields(FreeKVSettings)}
    for name in kwargs:
        if hasattr(args, _arg_name(name)):
            kwargs[name] = getattr(args, _arg_name(name))
    kwargs["dense_layers"] = tuple(kwargs["dense_layers"])
    s = FreeKVSettings(**kwargs)
    check_settings(s)
    return s


def export_env(s: FreeKVSettings, environ: dict[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    env.update(s.to_env())


# --- hooks (attached by freekv_sglang.sglang.plugin) -------------------------------------------


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


ENGINE_KEYWORDS: tuple[str, ...] = tuple(_arg_name(f.name) for f in fields(FreeKVSettings))


def engine_init_around(original: Callable[..., Any], self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on ``sglang.Engine.__init__``: accept ``kv_offload=`` and ``freekv_*=``."""
    ours = {k: kwargs.pop(k) for k in list(kwargs) if k in ENGINE_KEYWORDS}
    if not ours:
        return original(self, *args, **kwargs)
    base = settings_from_env()
    values = {f.name: getattr(base, f.name) for f in fields(FreeKVSettings)}
    for k, v in ours.items():
        name = "kv_offload" if k == "kv_offload" else k[len("freekv_") :]
        values[name] = tuple(v) if name == "dense_layers" else v
    s = FreeKVSettings(**values)
    check_settings(s)
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
    pp = _field(server_args, "pp_size") or 1
    if pp > 1:
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support pipeline parallelism (--pp-size {pp})"
        )
    tp = _field(server_args, "tp_size") or 1
    if tp > 1:
        raise FreeKVStartupError(
            f"--kv-offload freekv supports one tensor-parallel rank only (--tp-size {tp})"
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
    if kv_dtype not in (None, "auto", "bf16", "bfloat16", "fp16", "float16"):
        raise FreeKVStartupError(
            f"--kv-offload freekv keeps 16-bit (or the model's) keys and values; --kv-cache-dtype "
            f"{kv_dtype} is not supported (use auto, bf16 or fp16)"
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
    for flag, name in CUDA_GRAPH_FIELDS:
        graphs = _field(server_args, name)
        if graphs not in (None, "disabled"):
            raise FreeKVStartupError(
                f"--kv-offload freekv runs host-side bookkeeping every step and cannot be "
                f"captured in a CUDA graph: {flag} {graphs} (use disabled or leave it unset)"
            )
    if _field(server_args, "enable_hierarchical_cache"):
        raise FreeKVStartupError(
            "--kv-offload freekv and --enable-hierarchical-cache both offload the KV cache; use one"
        )


#: ``model_type`` values of multi-head latent attention (MLA) models. Their KV cache is one
#: compressed latent per token, not per-head keys and values, so FreeKV's per-head pages,
#: digests and recall do not apply.
MLA_MODEL_TYPES: tuple[str, ...] = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2")


def check_model_config(config: Any, model_path: str) -> None:
    """Refuse models FreeKV cannot serve, from their (HF) config alone; names the flag."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    if getattr(text, "kv_lora_rank", None) or model_type in MLA_MODEL_TYPES:
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support --model-path {model_path}: it uses multi-head "
            f"latent attention (model_type {model_type}); supported: models with multi-head or "
            "grouped-query attention (per-head keys and values)"
        )
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if isinstance(heads, int) and isinstance(kv_heads, int) and (kv_heads < 1 or heads % kv_heads):
        raise FreeKVStartupError(
            f"--kv-offload freekv does not support --model-path {model_path}: "
            f"{heads} query heads are not a whole multiple of {kv_heads} KV heads"
        )


def host_page_bytes(config: Any, page_size: int, dtype: str | None) -> int | None:
    """Bytes of one host page (every layer's K and V of ``page_size`` tokens) of the model
    with this (HF) config; ``dtype`` is ``--dtype`` (4-byte elements for float32, else 2).
    None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and isinstance(heads, int) and heads > 0:
        hidden = getattr(text, "hidden_size", None)
        head_dim = hidden // heads if isinstance(hidden, int) else None
    if not all(isinstance(x, int) and x > 0 for x in (layers, kv_heads, head_dim)):
        return None
    elem = 4 if dtype in ("float32", "float") else 2
    return int(layers) * int(kv_heads) * int(head_dim) * 2 * page_size * elem


def check_model(server_args: Any, settings: FreeKVSettings | None = None) -> None:
    """Read the model's config with ``transformers.AutoConfig`` (no weights) and check it;
    with ``settings``, also that its host pool fits the pool's page slots.

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
    try:
        from sglang.srt.arg_groups.overrides import resolving_view

        view = resolving_view(server_args)
    except Exception:  # older layouts: read the record directly
        view = server_args
    if not s.enabled:
        if getattr(view, "radix_cache_backend", None) == "freekv":
            raise FreeKVStartupError(
                "--radix-cache-backend freekv keeps prefixes in FreeKV's host pool: it needs "
                "--kv-offload freekv"
            )
        return
    check_server_args(view, s)
    check_model(view, s)
    from sglang.srt.arg_groups.overrides import declare_resolution

    device = resolved_device(view)
    defaults: dict[str, Any] = {}
    if getattr(view, "attention_backend", None) is None and device in DEFAULT_ATTENTION_BACKEND:
        defaults["attention_backend"] = DEFAULT_ATTENTION_BACKEND[device]
    if device == "cuda":
        for _flag, name in CUDA_GRAPH_FIELDS:
            if getattr(view, name, None) is None:
                defaults[name] = "disabled"
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
    from freekv_sglang.sglang.plugin import verify_hooks

    verify_hooks()
