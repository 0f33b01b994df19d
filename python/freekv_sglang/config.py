"""FreeKV settings: one frozen, validated object shared by every layer of the package.

Who uses it: the SGLang adapter builds one `FreeKVConfig` at start-up (from server arguments)
and passes it, read-only, to the retrieval functions, the per-request state and the reference
decode step. It is immutable, so it can be shared across threads and pickled to scheduler
subprocesses without locks.

Where the FreeKV paper (arXiv 2505.13109) and its released code differ, the difference is a
field, and the default is the paper's choice:

- ``digest_kind``: ``"minmax"`` (paper, Quest's element-wise min/max bound of post-RoPE keys) or
  ``"mean"`` (one mean key per page, as some released retrieval baselines use);
- ``gqa_reduction``: ``"softmax_mean"`` (paper's group-consistent selection: softmax over pages
  per query head, then mean over the group), ``"mean"`` or ``"max"`` of the raw scores;
- ``dense_layers``: layers that always attend to the whole context (the paper's accuracy runs
  keep layer 0 dense, hence the default ``(0,)``);
- ``budget_tokens`` / ``budget_includes_sink_window``: the budget counts sink + selected +
  window tokens (paper) unless ``budget_includes_sink_window=False``, in which case it counts
  the selected tokens only.

Page geometry used everywhere (``p = page_size``, a context of ``L`` tokens):
logical pages ``0 .. ceil(L/p) - 1``; sink pages ``[0, num_sink_pages)``; window pages are the
last ``num_window_pages`` logical pages (the last one may be partially filled); candidate pages
for selection are the full pages in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

DigestKind = Literal["minmax", "mean"]
GqaReduction = Literal["softmax_mean", "mean", "max"]
SelectionMode = Literal["speculative", "current", "none"]

DIGEST_KINDS: tuple[str, ...] = ("minmax", "mean")
GQA_REDUCTIONS: tuple[str, ...] = ("softmax_mean", "mean", "max")
SELECTION_MODES: tuple[str, ...] = ("speculative", "current", "none")


class FreeKVConfigError(ValueError):
    """A FreeKV setting is invalid; the message names the field and what is allowed."""


@dataclass(frozen=True)
class FreeKVConfig:
    """FreeKV retrieval settings (validated on construction).

    Attributes:
        page_size: tokens per page ``p`` (released code: 32).
        sink_tokens: attention-sink tokens kept at the start of the context; a whole number of
            pages, may be 0.
        window_tokens: most recent tokens always attended; a whole number of pages, at least
            one page (the page being filled is always in the window).
        selected_pages: pages chosen by retrieval per KV head. Give this or ``budget_tokens``,
            not both.
        budget_tokens: token budget per (request, layer, KV head). With
            ``budget_includes_sink_window=True`` (paper) it is sink + selected + window; with
            False it is the selected tokens only. Must be a whole number of pages and leave at
            least one selected page. Default when neither is given: 2048 (released code:
            512 sink + 512 window + 1024 selected).
        budget_includes_sink_window: the meaning of ``budget_tokens`` (see above).
        tau: correction threshold on the group-mean cosine of ``q_t`` and ``q_{t-1}``, in
            [-1, 1]; ``None`` turns correction off (pure speculative). Paper: 0.8 for long
            inputs, 0.9 for long generation.
        dense_layers: layer indices that always attend densely (paper: layer 0).
        gqa_reduction: how query-head page scores become one score per KV head.
        digest_kind: page digest, see the module docstring.
        selection: ``"speculative"`` (FreeKV: step t's query selects step t+1's pages, with
            correction), ``"current"`` (Quest/ArkVale: select with the current query each
            step) or ``"none"`` (sink + window only). Used by the reference decode step.
    """

    page_size: int = 32
    sink_tokens: int = 512
    window_tokens: int = 512
    selected_pages: int | None = None
    budget_tokens: int | None = None
    budget_includes_sink_window: bool = True
    tau: float | None = 0.8
    dense_layers: tuple[int, ...] = (0,)
    gqa_reduction: GqaReduction = "softmax_mean"
    digest_kind: DigestKind = "minmax"
    selection: SelectionMode = "speculative"
    _num_selected: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        p = self.page_size
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise FreeKVConfigError(f"page_size must be a positive integer, got {p!r}")
        for name in ("sink_tokens", "window_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FreeKVConfigError(f"{name} must be a non-negative integer, got {v!r}")
            if v % p:
                raise FreeKVConfigError(
                    f"{name} must be a whole number of pages (a multiple of page_size={p}), got {v}"
                )
        if self.window_tokens < p:
            raise FreeKVConfigError(
                f"window_tokens must be at least one page (page_size={p}), got "
                f"{self.window_tokens}: the page being filled is always attended"
            )
        if self.selected_pages is not None and self.budget_tokens is not None:
            raise FreeKVConfigError(
                "give either selected_pages or budget_tokens, not both "
                f"(got selected_pages={self.selected_pages}, budget_tokens={self.budget_tokens})"
            )
        if self.selected_pages is not None:
            k = self.selected_pages
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise FreeKVConfigError(f"selected_pages must be an integer >= 1, got {k!r}")
        else:
            budget = 2048 if self.budget_tokens is None else self.budget_tokens
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
                raise FreeKVConfigError(f"budget_tokens must be a positive integer, got {budget!r}")
            if budget % p:
                raise FreeKVConfigError(
                    f"budget_tokens must be a whole number of pages (a multiple of "
                    f"page_size={p}), got {budget}"
                )
            fixed = self.sink_tokens + self.window_tokens if self.budget_includes_sink_window else 0
            if budget < fixed + p:
                raise FreeKVConfigError(
                    f"budget_tokens={budget} is below sink_tokens + window_tokens + one page "
                    f"= {fixed + p}; allowed: budget_tokens >= {fixed + p}"
                )
            k = (budget - fixed) // p
        object.__setattr__(self, "_num_selected", k)
        if self.tau is not None:
            t = self.tau
            if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t):
                raise FreeKVConfigError(f"tau must be a number in [-1, 1] or None, got {t!r}")
            if not -1.0 <= float(t) <= 1.0:
                raise FreeKVConfigError(f"tau must be in [-1, 1] or None (off), got {t}")
        layers = tuple(self.dense_layers)
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise FreeKVConfigError(
                f"dense_layers must hold non-negative layer indices, got {self.dense_layers!r}"
            )
        object.__setattr__(self, "dense_layers", layers)
        if self.gqa_reduction not in GQA_REDUCTIONS:
            raise FreeKVConfigError(
                f"gqa_reduction must be one of {GQA_REDUCTIONS}, got {self.gqa_reduction!r}"
            )
        if self.digest_kind not in DIGEST_KINDS:
            raise FreeKVConfigError(
                f"digest_kind must be one of {DIGEST_KINDS}, got {self.digest_kind!r}"
            )
        if self.selection not in SELECTION_MODES:
            raise FreeKVConfigError(
                f"selection must be one of {SELECTION_MODES}, got {self.selection!r}"
            )

    @property
    def num_sink_pages(self) -> int:
        return self.sink_tokens // self.page_size

    @property
    def num_window_pages(self) -> int:
        return self.window_tokens // self.page_size

    @property
    def num_selected_pages(self) -> int:
        """Pages selected per (request, layer, KV head): the ``k`` of top-k and the slot count."""
        return self._num_selected

    @property
    def budget_pages(self) -> int:
        """Sink + selected + window pages: a request whose context fits attends densely."""
        return self.num_sink_pages + self.num_selected_pages + self.num_window_pages

    @property
    def total_budget_tokens(self) -> int:
        return self.budget_pages * self.page_size

    def is_dense_layer(self, layer: int) -> bool:
        return layer in self.dense_layers
