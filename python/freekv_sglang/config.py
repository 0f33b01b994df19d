"""FreeKV settings: one frozen, validated object shared by every layer of the package.

Who uses it: the SGLang adapter builds one `FreeKVConfig` at start-up (from server arguments)
and passes it, read-only, to the retrieval functions, the per-request state and the reference
decode step. It is immutable, so it can be shared across threads and pickled to scheduler
subprocesses without locks.

Where the FreeKV paper (arXiv 2505.13109) and its released code differ, the difference is a
field, and the default is the paper's choice:

- ``digest_kind``: ``"minmax"`` (paper, Quest's element-wise min/max bound of post-RoPE keys),
  ``"mean"`` (one mean key per page, as some released retrieval baselines use) or
  ``"minmax_slow"`` (the bound over the slower half of the rotary pairs only; an accuracy
  study's option, see ``docs/selection.md``: the reference step takes it, the digest op and
  the server take ``"minmax"`` and ``"mean"``);
- ``gqa_reduction``: ``"softmax_mean"`` (paper's group-consistent selection: softmax over pages
  per query head, then mean over the group), ``"mean"`` or ``"max"`` of the raw scores;
- ``rerank`` / ``rerank_bits``: off by default (the paper's selection). With ``rerank = R``
  each selection re-ranks every KV head's ``R x k`` best pages under the bound by their best
  logit, read from a ``rerank_bits``-bit copy of the keys kept on the device beside the
  digests (``docs/selection.md``; the op: ``freekv_sglang.ops.rerank``);
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from string import Formatter
from typing import Any, Literal

from freekv_sglang.ops.rerank import MAX_RERANK_CANDIDATES, RERANK_BITS

DigestKind = Literal["minmax", "mean", "minmax_slow"]
GqaReduction = Literal["softmax_mean", "mean", "max"]
SelectionMode = Literal["speculative", "current", "none"]

DIGEST_KINDS: tuple[str, ...] = ("minmax", "mean", "minmax_slow")
GQA_REDUCTIONS: tuple[str, ...] = ("softmax_mean", "mean", "max")
SELECTION_MODES: tuple[str, ...] = ("speculative", "current", "none")

_WHOLE_PAGES = (
    "{field} must be a whole number of pages (a multiple of {page_size}={p}), got {value}"
)
_ONE_OF = "{field} must be one of {allowed}, got {value!r}"


class FreeKVConfigError(ValueError):
    """A FreeKV setting is invalid; the message names the field and what is allowed.

    ``field`` is the field at fault. The message is ``template`` with the field names filled
    in: ``{field}`` stands for the field at fault, any other placeholder not among ``values``
    for the field of that name, and the placeholders among ``values`` for those values.
    ``str(error)`` names the fields as such; :meth:`describe` names them as a caller spells
    them (the SGLang adapter passes its flags), so the message never has to be rewritten.
    """

    def __init__(self, field: str, template: str, **values: Any) -> None:
        self.field = field
        self.template = template
        self.values = values
        super().__init__(self.describe())

    def describe(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each field called ``names[field]`` (its own name when absent)."""
        names = names or {}
        fields: dict[str, str] = {}
        for _, key, _, _ in Formatter().parse(self.template):
            if key and key not in self.values:
                name = self.field if key == "field" else key
                fields[key] = names.get(name, name)
        return self.template.format(**fields, **self.values)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_config_error, (type(self), self.field, self.template, self.values))


def _config_error(
    cls: type[FreeKVConfigError], field: str, template: str, values: dict[str, Any]
) -> FreeKVConfigError:
    return cls(field, template, **values)


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
        rerank: ``R``: re-rank the bound's ``R x k`` best pages per KV head by their best
            logit (0: off, the paper's selection).
        rerank_bits: bits per key element of the copy the re-ranking reads (2 or 4).
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
    rerank: int = 0
    rerank_bits: int = 2
    _num_selected: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        p = self.page_size
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise FreeKVConfigError(
                "page_size", "{field} must be a positive integer, got {value!r}", value=p
            )
        for name in ("sink_tokens", "window_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FreeKVConfigError(
                    name, "{field} must be a non-negative integer, got {value!r}", value=v
                )
            if v % p:
                raise FreeKVConfigError(name, _WHOLE_PAGES, p=p, value=v)
        if self.window_tokens < p:
            raise FreeKVConfigError(
                "window_tokens",
                "{field} must be at least one page ({page_size}={p}), got {value}: the page "
                "being filled is always attended",
                p=p,
                value=self.window_tokens,
            )
        if self.selected_pages is not None and self.budget_tokens is not None:
            raise FreeKVConfigError(
                "selected_pages",
                "give either {selected_pages} or {budget_tokens}, not both "
                "(got {selected_pages}={k}, {budget_tokens}={budget})",
                k=self.selected_pages,
                budget=self.budget_tokens,
            )
        if self.selected_pages is not None:
            k = self.selected_pages
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise FreeKVConfigError(
                    "selected_pages", "{field} must be an integer >= 1, got {value!r}", value=k
                )
        else:
            budget = 2048 if self.budget_tokens is None else self.budget_tokens
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
                raise FreeKVConfigError(
                    "budget_tokens",
                    "{field} must be a positive integer, got {value!r}",
                    value=budget,
                )
            if budget % p:
                raise FreeKVConfigError("budget_tokens", _WHOLE_PAGES, p=p, value=budget)
            fixed = self.sink_tokens + self.window_tokens if self.budget_includes_sink_window else 0
            if budget < fixed + p:
                raise FreeKVConfigError(
                    "budget_tokens",
                    "{field}={value} is below {sink_tokens} + {window_tokens} + one page "
                    "= {least}; allowed: {field} >= {least}",
                    value=budget,
                    least=fixed + p,
                )
            k = (budget - fixed) // p
        object.__setattr__(self, "_num_selected", k)
        if self.tau is not None:
            t = self.tau
            if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t):
                raise FreeKVConfigError(
                    "tau", "{field} must be a number in [-1, 1] or None, got {value!r}", value=t
                )
            if not -1.0 <= float(t) <= 1.0:
                raise FreeKVConfigError(
                    "tau", "{field} must be in [-1, 1] or None (off), got {value}", value=t
                )
        layers = tuple(self.dense_layers)
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise FreeKVConfigError(
                "dense_layers",
                "{field} must hold non-negative layer indices, got {value!r}",
                value=self.dense_layers,
            )
        object.__setattr__(self, "dense_layers", layers)
        if self.gqa_reduction not in GQA_REDUCTIONS:
            raise FreeKVConfigError(
                "gqa_reduction", _ONE_OF, allowed=GQA_REDUCTIONS, value=self.gqa_reduction
            )
        if self.digest_kind not in DIGEST_KINDS:
            raise FreeKVConfigError(
                "digest_kind", _ONE_OF, allowed=DIGEST_KINDS, value=self.digest_kind
            )
        if self.selection not in SELECTION_MODES:
            raise FreeKVConfigError(
                "selection", _ONE_OF, allowed=SELECTION_MODES, value=self.selection
            )
        r = self.rerank
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise FreeKVConfigError(
                "rerank", "{field} must be an integer >= 0 (0: off), got {value!r}", value=r
            )
        if self.rerank_bits not in RERANK_BITS:
            raise FreeKVConfigError(
                "rerank_bits", _ONE_OF, allowed=RERANK_BITS, value=self.rerank_bits
            )
        if r * self._num_selected > MAX_RERANK_CANDIDATES:
            raise FreeKVConfigError(
                "rerank",
                "{field} x selected pages = {n} pages re-ranked per KV head; the select kernel "
                "re-ranks at most {most} (lower {field} or the budget)",
                n=r * self._num_selected,
                most=MAX_RERANK_CANDIDATES,
            )
        if r and self.digest_kind != "minmax":
            raise FreeKVConfigError(
                "rerank",
                "{field} reads key codes between each page's min and max, which only the "
                "{digest_kind}='minmax' digest stores; got {digest_kind}={kind!r}",
                kind=self.digest_kind,
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
    def rerank_candidates(self) -> int:
        """Pages per KV head the re-ranking scores (``rerank x k``; 0: off)."""
        return self.rerank * self._num_selected

    @property
    def budget_pages(self) -> int:
        """Sink + selected + window pages: a request whose context fits attends densely."""
        return self.num_sink_pages + self.num_selected_pages + self.num_window_pages

    @property
    def total_budget_tokens(self) -> int:
        return self.budget_pages * self.page_size

    def is_dense_layer(self, layer: int) -> bool:
        return layer in self.dense_layers
