"""The FreeKV server settings: one table from which every spelling of a setting is made.

Each field of :class:`FreeKVSettings` is one row of the table, declared with :func:`setting`:
its flag, default, parser, help and value checks. A row's other two spellings follow from it:

- the environment variable is ``FREEKV_`` and the field name in capitals (``budget`` ->
  ``FREEKV_BUDGET``); :func:`settings_from_env` reads the variables and
  :meth:`FreeKVSettings.to_env` writes them;
- the ``sglang.Engine`` keyword is the flag without its leading dashes, with underscores
  (``--freekv-budget`` -> ``freekv_budget``), which is also argparse's destination for the flag.

:data:`SETTINGS` holds the rows in field order. The SGLang adapter
(:mod:`freekv_sglang.sglang.args`) builds its argument group, the launcher's export to the
environment and the Engine keywords from it, and a row naming a :class:`FreeKVConfig` field
(``config_field``) is passed to the config by :meth:`FreeKVSettings.retrieval_config`, whose
errors then name the row's flag. Adding a setting is adding one field here.

Who calls what: the adapter, at start-up, in the launcher (flags), in ``sglang.Engine``
(keywords) and in every scheduler and HTTP process (the environment the launcher or the Engine
exported). The settings are immutable; nothing here keeps state besides ``os.environ`` or imports
SGLang.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from freekv_sglang.config import FreeKVConfig, FreeKVConfigError

OFFLOAD_MODES: tuple[str, ...] = ("none", "freekv")
#: Page selection of the serving path: FreeKV's speculative retrieval, or the synchronous
#: baseline (select with the current query and recall before attention, as Quest/ArkVale).
SELECTIONS: tuple[str, ...] = ("speculative", "current")
#: Slots of the host page pool: the Rust pool's page index is 32 bits wide.
HOST_POOL_MAX_PAGES = 2**32
ENV_PREFIX = "FREEKV_"


class FreeKVStartupError(ValueError):
    """An unsupported FreeKV setting or combination; the message names the flag.

    ``flag`` is the flag of the setting at fault when one setting is (None for combinations)."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.flag = flag


# --- parsers (argparse names a bad value's type by the function name: "invalid int value") ----


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


# --- the inverse of the parsers: a value as its variable holds it ----------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _text_tau(value: float | None) -> str:
    return "off" if value is None else repr(value)


def _text_layers(value: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in value)


def host_memory_bytes() -> int | None:
    """Physical memory of this host (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_pool_gb(gb: float, memory_bytes: int | None = None) -> None:
    """``--freekv-host-pool-gb``: a finite size above 0 that the host's memory can hold (the
    pool is pinned, so it must be resident). ``memory_bytes`` defaults to this host's."""
    memory = host_memory_bytes() if memory_bytes is None else memory_bytes
    limit = "" if memory is None else f" and at most this host's memory, {memory / 2**30:.1f} GiB"
    if not math.isfinite(gb) or gb <= 0 or (memory is not None and gb * 2**30 > memory):
        raise FreeKVStartupError(
            f"--freekv-host-pool-gb {gb:g}: the host pool size must be a number of GiB above 0"
            f"{limit}",
            flag="--freekv-host-pool-gb",
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
            "and --freekv-page-size)",
            flag="--freekv-host-pool-gb",
        )


@dataclass(frozen=True)
class Setting:
    """One row of the settings table (see the module docstring).

    ``parse`` turns the text of a flag or variable into the value (argparse's ``type``);
    ``text`` is its inverse. ``choices``, ``minimum`` and ``check`` are the checks a value that
    is not None must pass; ``config_field`` names the :class:`FreeKVConfig` field the value
    becomes, whose own checks run when FreeKV is on."""

    name: str
    flag: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    check: Callable[[Any], None] | None = None
    config_field: str | None = None
    text: Callable[[Any], str] = _text

    @property
    def env(self) -> str:
        """The ``FREEKV_*`` variable."""
        return ENV_PREFIX + self.name.upper()

    @property
    def keyword(self) -> str:
        """The ``sglang.Engine`` keyword, also the flag's argparse destination."""
        return self.flag.lstrip("-").replace("-", "_")

    def help_text(self) -> str:
        """The flag's help: the row's text and, when the default is a value, the default."""
        if self.default is None:
            return self.help
        return f"{self.help} Default: {self.text(self.default)}."

    def read(self, raw: str) -> Any:
        """The value of the variable's text ``raw``; a bad one names the variable."""
        try:
            return self.parse(raw)
        except ValueError as e:
            raise FreeKVStartupError(
                f"{self.env}={raw!r} is not valid: {e}", flag=self.flag
            ) from None

    def validate(self, value: Any) -> None:
        """The row's own checks (the config's come with :meth:`FreeKVSettings.retrieval_config`)."""
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise FreeKVStartupError(
                f"{self.flag} must be one of {self.choices}, got {value!r}", flag=self.flag
            )
        if self.minimum is not None and value < self.minimum:
            raise FreeKVStartupError(
                f"{self.flag} must be at least {self.minimum}, got {value}", flag=self.flag
            )
        if self.check is not None:
            self.check(value)


_ROW = "freekv_setting"


def setting(
    flag: str,
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    **row: Any,
) -> Any:
    """A field of :class:`FreeKVSettings` carrying its row of the table (the row's ``name`` is
    the field's, filled in by :data:`SETTINGS`)."""
    return field(default=default, metadata={_ROW: Setting("", flag, default, parse, help, **row)})


@dataclass(frozen=True)
class FreeKVSettings:
    """Every FreeKV server setting; each field is a row of the table (:data:`SETTINGS`)."""

    kv_offload: str = setting(
        "--kv-offload",
        "none",
        str,
        "KV-cache offload mode. 'freekv' keeps the full KV cache in a host pool and a "
        "per-request budget of pages on the device, chosen by speculative retrieval.",
        choices=OFFLOAD_MODES,
    )
    budget: int = setting(
        "--freekv-budget",
        2048,
        int,
        "FreeKV token budget per request, layer and KV head (sink + selected + window). "
        "A request whose context fits attends densely.",
        config_field="budget_tokens",
    )
    sink: int = setting(
        "--freekv-sink", 512, int, "FreeKV attention-sink tokens.", config_field="sink_tokens"
    )
    window: int = setting(
        "--freekv-window",
        512,
        int,
        "FreeKV most-recent tokens attended.",
        config_field="window_tokens",
    )
    page_size: int = setting(
        "--freekv-page-size", 32, int, "FreeKV tokens per page.", config_field="page_size"
    )
    tau: float | None = setting(
        "--freekv-tau",
        0.8,
        _parse_tau,
        "FreeKV correction threshold on the group-mean cosine of consecutive queries; "
        "'off' disables correction.",
        config_field="tau",
        text=_text_tau,
    )
    dense_layers: tuple[int, ...] = setting(
        "--freekv-dense-layers",
        (0,),
        _parse_layers,
        "FreeKV layers that always attend densely, comma-separated ('' for none).",
        config_field="dense_layers",
        text=_text_layers,
    )
    host_pool_gb: float | None = setting(
        "--freekv-host-pool-gb",
        None,
        _parse_opt_float,
        "FreeKV host KV pool size in GiB per scheduler rank (each tensor- or data-parallel rank "
        "has its own pool of its KV heads; default: 4x the rank's device KV pool, at most a "
        "quarter of the host's available memory shared among the host's ranks).",
        check=check_host_pool_gb,
    )
    conversion_threads: int | None = setting(
        "--freekv-conversion-threads",
        None,
        _parse_opt_int,
        "Threads converting offloaded pages to the host layout (default: automatic).",
        minimum=1,
    )
    sparse_requests: int | None = setting(
        "--freekv-sparse-requests",
        None,
        _parse_opt_int,
        "FreeKV budget regions allocated on the device at start-up: how many requests over "
        "budget decode sparsely at once; others are held dense until one frees (default: the "
        "running-request limit, capped at 40%% of the device memory left after SGLang's pools; "
        "an eighth of available memory on CPU).",
        minimum=1,
    )
    selection: str = setting(
        "--freekv-selection",
        "speculative",
        str,
        "FreeKV page selection: 'speculative' (step t's query selects and recalls step t+1's "
        "pages off the critical path, with correction) or 'current' (the synchronous baseline: "
        "select with this step's query and recall before attention).",
        choices=SELECTIONS,
        config_field="selection",
    )
    rerank: int = setting(
        "--freekv-rerank",
        0,
        int,
        "FreeKV re-ranking: each selection scores the bound's best R x k pages per KV head "
        "again by their best logit, read from a few-bit copy of the keys kept on the device "
        "(R; 0: off, the paper's selection; R x selected pages <= 512). Measured on needle "
        "sets: 32 with 4-bit keys at a 512-token budget, 8 with 2-bit keys at 1024 and 2048.",
        config_field="rerank",
    )
    rerank_bits: int = setting(
        "--freekv-rerank-bits",
        2,
        int,
        "Bits per key element of the copy --freekv-rerank reads (2 or 4): device memory of "
        "bits/16 of the host pool's keys.",
        config_field="rerank_bits",
    )

    def __post_init__(self) -> None:
        # The Engine keyword may be a list; the settings stay hashable and comparable.
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))

    @property
    def enabled(self) -> bool:
        return self.kv_offload == "freekv"

    def retrieval_config(self) -> FreeKVConfig:
        """The core's config; a bad value raises :class:`FreeKVStartupError` naming the flag
        of the config field at fault (and the flags of the fields its message refers to)."""
        values = {r.config_field: getattr(self, r.name) for r in SETTINGS if r.config_field}
        try:
            return FreeKVConfig(**values)
        except FreeKVConfigError as e:
            raise FreeKVStartupError(
                f"invalid FreeKV setting: {e.describe(CONFIG_FLAGS)}",
                flag=CONFIG_FLAGS.get(e.field),
            ) from None

    def to_env(self) -> dict[str, str]:
        """Every setting as its ``FREEKV_*`` variable (:func:`settings_from_env` reads it back)."""
        return {r.env: r.text(getattr(self, r.name)) for r in SETTINGS}


#: The settings table: one row per field of :class:`FreeKVSettings`, in field order.
SETTINGS: tuple[Setting, ...] = tuple(
    replace(f.metadata[_ROW], name=f.name) for f in fields(FreeKVSettings)
)
#: The flag of each :class:`FreeKVConfig` field a setting becomes.
CONFIG_FLAGS: dict[str, str] = {r.config_field: r.flag for r in SETTINGS if r.config_field}


def check_settings(s: FreeKVSettings) -> None:
    """Value checks that need no model or server context (each names its flag)."""
    for row in SETTINGS:
        row.validate(getattr(s, row.name))
    if s.enabled:
        s.retrieval_config()


def settings_from_env(environ: Mapping[str, str] | None = None) -> FreeKVSettings:
    """Settings from ``FREEKV_*`` variables (unset ones keep their defaults)."""
    env = os.environ if environ is None else environ
    s = FreeKVSettings(**{r.name: r.read(env[r.env]) for r in SETTINGS if r.env in env})
    check_settings(s)
    return s


def override(base: FreeKVSettings, values: Mapping[str, Any]) -> FreeKVSettings:
    """``base`` with the settings named in ``values`` (by field name) replaced, checked."""
    s = replace(base, **values)
    check_settings(s)
    return s


def export_env(s: FreeKVSettings, environ: dict[str, str] | None = None) -> None:
    """Write ``s`` to the environment (default: this process's, which subprocesses inherit)."""
    env = os.environ if environ is None else environ
    env.update(s.to_env())
