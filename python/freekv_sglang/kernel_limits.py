"""What FreeKV's CUDA kernels take: one table, from which the start-up checks and the docs come.

Each :class:`KernelLimit` row is one limit of the launchers in ``cuda/csrc`` (their
``TORCH_CHECK`` and dispatch), the flag that sets the value, and the values allowed. On a CUDA
device the SGLang adapter (:mod:`freekv_sglang.sglang.args` before any weight loads, where the
flags and the model's config tell the value; :mod:`freekv_sglang.sglang.attention_backend` with
the loaded model and the host pool's size) refuses a value outside a row with
:class:`~freekv_sglang.settings.FreeKVStartupError`, naming the flag and the allowed values. On a
CPU the torch references run instead of the kernels, so only the rows marked ``every_device``
apply there. :func:`markdown_table` is the table of ``docs/sglang-integration.md``.

Imports neither torch nor SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from freekv_sglang.settings import FreeKVStartupError

__all__ = [
    "DTYPE",
    "GQA_GROUP",
    "HEAD_DIM",
    "HOST_PAGES",
    "KERNEL_LIMITS",
    "KV_CACHE_DTYPE",
    "LAYERS",
    "PAGE_SIZE",
    "RERANK_CANDIDATES",
    "SELECTED_PAGES",
    "KernelLimit",
    "check_kernel_limits",
    "markdown_table",
]


@dataclass(frozen=True)
class KernelLimit:
    """One limit: ``what`` is limited, set by ``flag``; a value passes when it is one of
    ``values`` or, for a range, within ``low`` and ``high`` (inclusive). ``every_device``: the
    limit holds on a CPU as well (else only the CUDA kernels need it)."""

    what: str
    flag: str
    values: tuple[Any, ...] = ()
    low: int | None = None
    high: int | None = None
    note: str = ""
    every_device: bool = False

    def allows(self, value: Any) -> bool:
        if self.values:
            return value in self.values
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    @property
    def allowed(self) -> str:
        """The allowed values as the refusal and the docs write them."""
        if self.values:
            text = ", ".join(str(v) for v in self.values)
        else:
            text = f"{self.low} to {self.high}"
        return f"{text} ({self.note})" if self.note else text

    def check(self, value: Any, given: Any = None) -> None:
        """Refuse ``value`` unless allowed; ``given`` is what the flag was set to when the
        value is derived from it (the model for ``--model-path``, the budget for
        ``--freekv-budget``)."""
        if self.allows(value):
            return
        setting = f"{self.flag} {value if given is None else given}"
        where = "" if self.every_device else " on a GPU (the CUDA kernels)"
        raise FreeKVStartupError(
            f"--kv-offload freekv{where} does not support {setting}: {self.what} is {value}; "
            f"allowed: {self.allowed}",
            flag=self.flag,
        )


#: The model's dtype, the queries' and (with ``--kv-cache-dtype auto``) the keys' and values'.
DTYPE = KernelLimit(
    "the model's dtype (queries, keys and values)",
    "--dtype",
    values=("float16", "bfloat16"),
    note="or half, or auto where the model's dtype is one of these or float32, run as float16",
)
KV_CACHE_DTYPE = KernelLimit(
    "the KV cache dtype",
    "--kv-cache-dtype",
    values=("auto", "float16", "fp16", "bfloat16", "bf16"),
    note="auto: the model's dtype",
    every_device=True,
)
HEAD_DIM = KernelLimit("the model's head dimension", "--model-path", values=(64, 128, 256))
GQA_GROUP = KernelLimit(
    "the GQA group size (query heads per KV head)", "--model-path", low=1, high=128
)
LAYERS = KernelLimit("the model's attention layers", "--model-path", low=1, high=128)
PAGE_SIZE = KernelLimit("FreeKV's tokens per page", "--freekv-page-size", values=(16, 32, 64))
SELECTED_PAGES = KernelLimit(
    "the selected pages (budget slots) per request and KV head",
    "--freekv-budget",
    low=1,
    high=512,
    note="selected pages = (--freekv-budget - --freekv-sink - --freekv-window) / "
    "--freekv-page-size",
)
#: Checked where the value is made, by `freekv_sglang.config.FreeKVConfig` (its bound is the
#: select op's ``MAX_RERANK_CANDIDATES``, which the reference refuses too).
RERANK_CANDIDATES = KernelLimit(
    "the pages one selection re-ranks per KV head",
    "--freekv-rerank",
    low=1,
    high=512,
    note="--freekv-rerank x selected pages, when on",
    every_device=True,
)
HOST_PAGES = KernelLimit(
    "the host pool's pages",
    "--freekv-host-pool-gb",
    low=1,
    high=2**31 - 1,
    note="pages of every layer's K and V of --freekv-page-size tokens; the recall work rows "
    "hold them as int32",
)

#: Every limit, in the order the docs list them.
KERNEL_LIMITS: tuple[KernelLimit, ...] = (
    DTYPE,
    KV_CACHE_DTYPE,
    HEAD_DIM,
    GQA_GROUP,
    LAYERS,
    PAGE_SIZE,
    SELECTED_PAGES,
    RERANK_CANDIDATES,
    HOST_PAGES,
)

_DTYPE_NAMES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32"}


def dtype_name(dtype: Any) -> str:
    """``--dtype`` text or a torch dtype as the name :data:`DTYPE` lists."""
    name = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_NAMES.get(name, name)


def check_kernel_limits(
    *,
    model: Any = None,
    dtype: Any = None,
    head_dim: int | None = None,
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    num_layers: int | None = None,
    page_size: int | None = None,
    selected_pages: int | None = None,
    budget: int | None = None,
    host_pages: int | None = None,
    host_pool_gb: float | None = None,
) -> None:
    """Refuse every given value the CUDA kernels do not take (None: not known here).
    ``model``, ``budget`` and ``host_pool_gb`` are what the flags were given, named in the
    refusal."""
    if dtype is not None:
        DTYPE.check(dtype_name(dtype))
    if head_dim is not None:
        HEAD_DIM.check(head_dim, model)
    if num_q_heads is not None and num_kv_heads:
        GQA_GROUP.check(num_q_heads // num_kv_heads, model)
    if num_layers is not None:
        LAYERS.check(num_layers, model)
    if page_size is not None:
        PAGE_SIZE.check(page_size)
    if selected_pages is not None:
        SELECTED_PAGES.check(selected_pages, budget)
    if host_pages is not None:
        HOST_PAGES.check(host_pages, None if host_pool_gb is None else f"{host_pool_gb:g}")


def markdown_table() -> str:
    """The table of ``docs/sglang-integration.md``: limit, flag, allowed values, devices."""
    lines = ["| limit | flag | allowed | checked on |", "|---|---|---|---|"]
    for row in KERNEL_LIMITS:
        devices = "GPU and CPU" if row.every_device else "GPU"
        lines.append(f"| {row.what} | `{row.flag}` | {row.allowed} | {devices} |")
    return "\n".join(lines)
