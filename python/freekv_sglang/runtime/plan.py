"""FreeKV's memory plan: every byte the runtime allocates, computed before anything is.

Built by :class:`~freekv_sglang.runtime.facade.FreeKVRuntime` at construction (and by the
adapter, earlier, to size SGLang's KV pool and to refuse a configuration that does not fit),
from the model's geometry and the sizes chosen for the host pool, the budget regions and the
dense-layer store. The runtime allocates exactly :meth:`MemoryPlan.device_items` at
construction (a test sums the ``nbytes`` of what it allocated); :meth:`MemoryPlan.transient_items`
are allocated per step or per prefix load and freed after.

The figures (``e`` bytes per element, ``p`` page size, ``K`` selected pages, ``G`` budget
regions, ``N`` host pool pages, ``P = ceil(context / p)``, ``L`` layers of which ``Ls`` sparse and
``Ld`` dense, ``H``/``H_q`` KV/query heads, ``D`` head dim):

- digests, per host page and sparse layer: ``Ls * N * 2 * H * D * e``, i.e. ``2 / p`` of the keys
  they describe, ``1 / p * Ls / L`` of the host pool's bytes: the host pool's capacity sets a
  device cost;
- key codes (``--freekv-rerank``), per host page and sparse layer: ``Ls * N * H * p * D * b / 8``
  for ``b``-bit codes, ``b / 16`` of the keys they stand for (0 when off);
- residency and speculation, per region and layer: ``L * G * (H * (2K + P) * 8 + H_q * D * e +
  81)`` bytes, plus the region's host-page map ``G * P * 8`` and slot map ``G * K * 8``, and
  the decode step's inputs ``G * (4 * 8 + (F + K * p) * 4)`` (``F`` sink + window tokens: its
  buffers and attended tables, written by the host part of each step);
- budget regions: ``2 * L * G * K * p * H * D * e``;
- dense-layer store: ``2 * Ld * store_tokens * H * D * e``;
- host: the pool, ``N * L * 2 * p * H * D * e`` (pinned on a GPU host).

Nothing here grows with SGLang's request rows: only with the host pool and the regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime.prefix import LOAD_CHUNK_TOKENS
from freekv_sglang.state import COUNTER_NAMES, METRIC_NAMES

__all__ = ["MemoryPlan", "PlanError"]

_I64 = 8


class PlanError(ValueError):
    """FreeKV's memory does not fit; the message names the flag to change."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """The sizes of every FreeKV structure for one model runner (see the module doc)."""

    num_layers: int
    num_dense_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    elem_bytes: int
    page_size: int
    num_selected_pages: int
    max_pages: int  # P: pages of the longest context
    host_pages: int  # N
    regions: int  # G
    store_pages: int
    fixed_tokens: int = 0  # F: sink + window tokens
    rerank_bits: int = 0  # bits of the re-ranking's key codes (0: no codes)

    @classmethod
    def for_model(
        cls,
        cfg: FreeKVConfig,
        *,
        num_layers: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_seq_len: int,
        host_pages: int,
        regions: int,
        store_tokens: int,
    ) -> MemoryPlan:
        p = cfg.page_size
        dense = sum(1 for layer in cfg.dense_layers if layer < num_layers)
        return cls(
            num_layers=num_layers,
            num_dense_layers=dense,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            elem_bytes=torch.empty((), dtype=dtype).element_size(),
            page_size=p,
            num_selected_pages=cfg.num_selected_pages,
            max_pages=-(-max_seq_len // p),
            host_pages=host_pages,
            regions=regions,
            store_pages=store_tokens // p if dense else 0,
            fixed_tokens=cfg.sink_tokens + cfg.num_window_pages * p,
            rerank_bits=cfg.rerank_bits if cfg.rerank else 0,
        )

    # --- figures --------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        """One host page: K and V of ``page_size`` tokens, every layer and KV head."""
        return (
            2
            * self.num_layers
            * self.page_size
            * self.num_kv_heads
            * self.head_dim
            * (self.elem_bytes)
        )

    def device_items(self) -> dict[str, int]:
        """Bytes of each structure allocated at construction."""
        h, hq, d, e = self.num_kv_heads, self.num_q_heads, self.head_dim, self.elem_bytes
        k, p, n_p, g, n_l = (
            self.num_selected_pages,
            self.page_size,
            self.max_pages,
            self.regions,
            self.num_layers,
        )
        sparse = n_l - self.num_dense_layers
        per_region_layer = (
            h * k * _I64  # slot_to_page
            + h * n_p * _I64  # page_to_slot
            + h * k * _I64  # spec_pages
            + _I64  # spec_len
            + hq * d * e  # prev_query
            + 1  # has_prev
            + len(COUNTER_NAMES) * _I64  # counts
            + len(METRIC_NAMES) * 8  # metrics (float64)
        )
        retired = len(COUNTER_NAMES) * _I64 + len(METRIC_NAMES) * 8
        step = g * (4 * _I64 + (self.fixed_tokens + k * p) * 4)
        return {
            "digests": sparse * self.host_pages * 2 * h * d * e,
            "key_codes": sparse * self.host_pages * h * p * d * self.rerank_bits // 8,
            "residency": n_l * g * per_region_layer
            + retired
            + g * n_p * _I64
            + g * k * _I64
            + step,
            "budget_regions": 2 * n_l * g * k * p * h * d * e,
            "dense_store": 2 * self.num_dense_layers * self.store_pages * p * h * d * e,
        }

    def transient_items(self) -> dict[str, int]:
        """Peak bytes of what is allocated per step or per prefix load, then freed."""
        h, hq, d, e = self.num_kv_heads, self.num_q_heads, self.head_dim, self.elem_bytes
        k, p, n_p, g = self.num_selected_pages, self.page_size, self.max_pages, self.regions
        load_pages = max(1, LOAD_CHUNK_TOKENS // p)
        # One selection's outputs over every region (raw and reduced scores, selection, recall,
        # counts, work list); the forward and the recall stream may each hold one.
        select = g * (hq * n_p * 4 + h * n_p * 4 + 2 * h * k * _I64 + h * 3 * _I64 + h * k * 16)
        return {"load_staging": 2 * load_pages * p * h * d * e, "select_outputs": 2 * select}

    @property
    def persistent_bytes(self) -> int:
        return sum(self.device_items().values())

    @property
    def device_bytes(self) -> int:
        return self.persistent_bytes + sum(self.transient_items().values())

    @property
    def host_bytes(self) -> int:
        return self.host_pages * self.page_bytes

    def summary(self) -> str:
        """One line with every figure (the start-up log line)."""
        items = {**self.device_items(), **self.transient_items()}
        parts = ", ".join(f"{name} {_gib(b)}" for name, b in items.items())
        return (
            f"device {_gib(self.device_bytes)} ({parts}); host pool {_gib(self.host_bytes)} "
            f"({self.host_pages} pages); {self.regions} budget regions"
        )

    def check(self, free_device_bytes: int | None, host_bytes_available: int | None) -> None:
        """Refuse, naming the flag to change, when the plan does not fit what is free."""
        if free_device_bytes is not None and self.device_bytes > free_device_bytes:
            items = self.device_items()
            raise PlanError(
                f"FreeKV needs {_gib(self.device_bytes)} of device memory but "
                f"{_gib(free_device_bytes)} is free: digests {_gib(items['digests'])} and key "
                f"codes {_gib(items['key_codes'])} (lower --freekv-host-pool-gb, or "
                f"--freekv-rerank-bits), budget regions and residency "
                f"{_gib(items['budget_regions'] + items['residency'])} (lower "
                f"--freekv-sparse-requests or --freekv-budget), dense-layer store "
                f"{_gib(items['dense_store'])} (fewer --freekv-dense-layers); or lower "
                "--mem-fraction-static"
            )
        if host_bytes_available is not None and self.host_bytes > host_bytes_available:
            raise PlanError(
                f"the FreeKV host pool ({_gib(self.host_bytes)}) exceeds the host's available "
                f"memory ({_gib(host_bytes_available)}); lower --freekv-host-pool-gb"
            )
