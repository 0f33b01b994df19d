"""The host checks of a sparse decode step: offload waits and injected recall faults.

Before a selection of a layer can read a host page (its digest, its recall), the conversion
job that writes the page must be done. :class:`HostChecks` (owned by
:class:`~freekv_sglang.runtime.decode.SparseDecode`, on the scheduler thread) waits, per layer,
only for the jobs that write a page below a row's *recall horizon*: the first logical page no
selection of this decode step or of the speculative one for the next can choose. With a window
of two pages or more these waits run once per step in the host part (``prepare``); with one
they run inside each layer's step. The fault plan's recall faults are consulted at the same
points.
"""

from __future__ import annotations

from collections.abc import Callable

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.runtime.faults import FaultPlan
from freekv_sglang.runtime.offload import OffloadQueue

__all__ = ["HostChecks"]


class HostChecks:
    """Offload waits and recall faults before a layer's selections (see module doc)."""

    def __init__(
        self,
        cfg: FreeKVConfig,
        max_pages: int,
        offload: OffloadQueue,
        faults: FaultPlan,
        rids: Callable[[list[int]], list[str]],
        fail: Callable[[list[int], str], None],
    ) -> None:
        self.cfg = cfg
        self._max_pages = max_pages
        self._offload = offload
        self._faults = faults
        self._rids = rids
        self._fail = fail
        self._batch_len: dict[int, int] = {}
        self._horizon: dict[int, int] = {}

    def new_batch(self, batch_len: dict[int, int]) -> None:
        """A new forward batch (row -> length including its new tokens)."""
        self._batch_len = batch_len
        self._horizon = {}

    def run(self, layer: int, rows: list[int]) -> None:
        """Before a selection and recall of ``layer`` for ``rows``: wait for the layer's offload
        jobs that write a page below the rows' recall horizon (a host page is never read
        before its conversion finished), and fail the rows if the fault plan says so."""
        # Host pages are complete only once their jobs are done; the pages this step's
        # selections can choose were written a window's worth of pages ago, so this waits
        # only where the window is a single page or after a prefill.
        self._offload.wait_layer(layer, self._horizon_of(rows))
        if self._faults.armed:
            self._inject_recall_faults(layer, rows)

    def _inject_recall_faults(self, layer: int, rows: list[int]) -> None:
        """Fail the requests of ``rows`` the fault plan names for this recall: only those (a
        ``recall@PREFIX`` entry: the rest of the batch runs on), or all of them (the N-th
        recall: one batched recall failed). Their budget slots may hold stale data, so they
        abort; the batch's other requests are untouched."""
        live = [(r, ids[0]) for r in sorted(set(rows)) if (ids := self._rids([r]))]
        victims = set(self._faults.victims("recall", [rid for _r, rid in live]))
        failed = [r for r, rid in live if rid in victims]
        if failed:
            self._fail(
                failed,
                f"FreeKV recall into layer {layer} failed: injected recall failure (FREEKV_FAULTS)",
            )

    def _horizon_of(self, rows: list[int]) -> dict[int, int]:
        """Per row: the first logical page that no selection of this decode step or of the
        speculative one for the next can choose (candidates end where the window starts, at
        ``ceil(L / p) - num_window_pages`` for ``L`` tokens; the next step has one more). Kept
        for the batch: every sparse layer of a step asks for the same rows."""
        horizon = self._horizon
        p, w = self.cfg.page_size, self.cfg.num_window_pages
        for r in rows:
            if r not in horizon:
                n = self._batch_len.get(r)
                horizon[r] = self._max_pages if n is None else -(-(n + 1) // p) - w
        return horizon
