"""FreeKV's failures: the expected ones, their record and their injection in tests; and the
error that says the runtime itself is wrong.

The failure policy has one rule. Only FreeKV's own expected failures abort the requests they
touch, with a message: a conversion job that failed (:class:`~freekv_sglang.host_pool.FreeKVError`
from its ticket), a recall the host pool could not serve (:class:`RecallError`), an injected
fault. Anything else (a broken contract between two of our pieces, a CUDA error, an
:class:`InvariantError`, a plain bug) propagates and stops the server, as SGLang's own errors do:
serving on after one would risk wrong answers.

:class:`FailureLog` records the requests an offload job or a recall failed for (called from
:mod:`~freekv_sglang.runtime.offload` and :mod:`~freekv_sglang.runtime.decode` on the scheduler
thread); the adapter's scheduler hook reads it and aborts them. :class:`FaultPlan` injects such
failures for tests of the error paths (``FREEKV_FAULTS``).

Read once by :class:`~freekv_sglang.runtime.facade.FreeKVRuntime` at construction; consulted by
the offload path (:mod:`~freekv_sglang.runtime.offload`, through the facade) and the recall
path (:mod:`~freekv_sglang.runtime.decode`) on the scheduler thread. Unarmed (no
``FREEKV_FAULTS``), callers skip :meth:`FaultPlan.hit` altogether.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from freekv_sglang.runtime.rows import Row

logger = logging.getLogger(__name__)

__all__ = ["FailureLog", "FaultPlan", "InvariantError", "RecallError"]


class RecallError(RuntimeError):
    """A recall of host pages into budget slots failed (an expected failure: it aborts the
    requests whose slots it was filling)."""


class InvariantError(RuntimeError):
    """The runtime's own state is inconsistent (a bug, never an expected failure)."""


class FailureLog:
    """Live requests whose offload or recall failed: row -> (rid, message) until reported."""

    def __init__(self, rows: dict[int, Row]) -> None:
        self._rows = rows
        self._pending: dict[int, tuple[str, str]] = {}

    def fail(self, rows: list[int], message: str) -> None:
        """Mark the requests in ``rows`` failed (their KV is incomplete: the row keeps the
        mark until release, so nothing of it is published) and report them once."""
        for row in rows:
            info = self._rows.get(row)
            if info is not None and row not in self._pending:
                info.failed = True
                self._pending[row] = (info.rid, message)
                logger.error("freekv: request %s: %s", info.rid, message)

    def pending(self) -> dict[str, str]:
        return {rid: msg for rid, msg in self._pending.values()}

    def clear(self, rid: str) -> None:
        for row, (failed_rid, _msg) in list(self._pending.items()):
            if failed_rid == rid:
                del self._pending[row]

    def forget(self, row: int) -> None:
        self._pending.pop(row, None)


@dataclass
class FaultPlan:
    """Failures to inject, from ``FREEKV_FAULTS``: a comma list of

    - ``conversion:N`` / ``recall:N``: fail the N-th offload job / recall of this process
      (1-based);
    - ``conversion@PREFIX`` / ``recall@PREFIX``: fail the first offload job / recall that
      serves a request whose rid starts with ``PREFIX``, once per such request (so a test
      picks its victims by rid, whatever else the server ran before);

    each optionally followed by ``/rank=R``: only the runtime of tensor-parallel rank ``R``
    injects it (``recall@victim/rank=1``).

    Unset: inert."""

    at: dict[str, int] = field(default_factory=dict)
    prefix: dict[str, str] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    hit_rids: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def from_env(cls, rank: int = 0) -> FaultPlan:
        """The faults ``FREEKV_FAULTS`` plans for the runtime of tensor-parallel ``rank``."""
        spec = os.environ.get("FREEKV_FAULTS", "").strip()
        plan = cls()
        for entry in filter(None, (x.strip() for x in spec.split(","))):
            part, sep, only = entry.partition("/rank=")
            if sep and not only.isdigit():
                raise ValueError(f"FREEKV_FAULTS: {entry!r}: /rank= takes a rank number")
            mine = not sep or int(only) == rank  # every entry is checked, mine or not
            kind, at, arg = part.partition("@")
            if at and kind in ("conversion", "recall") and arg:
                if mine:
                    plan.prefix[kind] = arg
                continue
            kind, _, n = part.partition(":")
            if kind not in ("conversion", "recall") or not n.isdigit() or int(n) < 1:
                raise ValueError(
                    f"FREEKV_FAULTS: {part!r} is not conversion:N, recall:N (N >= 1), "
                    "conversion@RID_PREFIX or recall@RID_PREFIX, optionally with /rank=R"
                )
            if mine:
                plan.at[kind] = int(n)
        return plan

    @property
    def armed(self) -> bool:
        """Whether any fault is planned (unarmed, the per-step callers skip :meth:`hit`)."""
        return bool(self.at or self.prefix)

    def hit(self, kind: str, rids: list[str] | tuple[str, ...] = ()) -> bool:
        """Whether this ``kind`` of operation, serving requests ``rids``, must fail."""
        matched, counted = self._check(kind, rids)
        return counted or bool(matched)

    def victims(self, kind: str, rids: list[str] | tuple[str, ...]) -> list[str]:
        """The requests of ``rids`` that this ``kind`` of operation fails: those a
        ``KIND@PREFIX`` entry names, or all of them when the operation is a ``KIND:N``
        entry's N-th (one failed operation serves them all)."""
        matched, counted = self._check(kind, rids)
        return list(rids) if counted else matched

    def _check(self, kind: str, rids: list[str] | tuple[str, ...]) -> tuple[list[str], bool]:
        """The rids a prefix entry fails (each once), and whether the counted entry fires."""
        matched: list[str] = []
        want = self.prefix.get(kind)
        if want is not None:
            for rid in rids:
                if rid.startswith(want) and (kind, rid) not in self.hit_rids:
                    self.hit_rids.add((kind, rid))
                    matched.append(rid)
        counted = False
        if kind in self.at:
            self.seen[kind] = self.seen.get(kind, 0) + 1
            counted = self.seen[kind] == self.at[kind]
        return matched, counted
