"""Recording the ops a piece of device work dispatches, to show that a CUDA graph can hold it.

:func:`recording` runs a block under a ``TorchDispatchMode`` (:class:`OpRecorder`) that logs,
per op, its name and, per tensor argument, its shape, strides and dtype and, for a tensor inside
one of the named buffers (the ones that live across steps), which buffer and at what offset.
Two runs of the same work whose logs are equal dispatch the same ops on the same buffers with
the same shapes: what a CUDA graph captured in the first is what the second computes. The
recorder also lists what a graph cannot hold: an op that reads a device value on the host
(``_local_scalar_dense``, ``nonzero``, ``is_nonzero``, ``equal``), an op whose output shape
depends on values (``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave``
without ``output_size``), a tensor made from host data (``lift_fresh``) and, by patching
``torch.Tensor``, every ``tolist``, ``item``, ``bool``, ``int``, ``float``, ``index`` and
``numpy`` of a tensor. Launches of FreeKV's compiled ops (pybind functions the dispatcher does
not see) are logged as one entry each when their extension module is passed.

Used by ``tests/runtime/test_static_step.py`` and ``benchmarks/graph_check.py`` (the CPU dry
run of the capture-and-replay check); single-threaded, on the thread that runs the work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["FORBIDDEN", "OpRecorder", "recording"]

aten = torch.ops.aten
#: Ops that read a device value on the host, make a tensor from host data, or whose output
#: shape depends on values.
FORBIDDEN = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
}
_HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")
_EXT_OPS = ("correction_flags", "select_pages", "recall_direct", "page_digest")
_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


class OpRecorder(TorchDispatchMode):
    """The log (:attr:`log`) and the forbidden reads (:attr:`forbidden`) of one recording."""

    def __init__(self, buffers: dict[str, torch.Tensor], strict: bool = False) -> None:
        super().__init__()
        # Strict: a tensor neither in a named buffer nor made inside the block is logged with
        # its address, so two logs are equal only if the work read it at the same address.
        self._strict = strict
        self._made: set[int] = set()
        self._spans = []
        for name, t in buffers.items():
            st = t.untyped_storage()
            self._spans.append((st.data_ptr(), st.data_ptr() + st.nbytes(), name))
        self.log: list[tuple[Any, ...]] = []
        self.forbidden: list[str] = []

    def _where(self, t: torch.Tensor) -> tuple[str, int] | None:
        ptr = t.data_ptr()
        for lo, hi, name in self._spans:
            if lo <= ptr < hi or ptr == lo == hi:
                return name, ptr - lo
        return None

    def describe(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x if isinstance(x, int | float | bool | str | type(None)) else type(x).__name__
        desc = (tuple(x.shape), tuple(x.stride()), x.dtype)
        where = self._where(x)
        if where is not None:
            return ("buf", *where, *desc)
        if self._strict and x.untyped_storage().data_ptr() not in self._made:
            return ("outside", x.data_ptr(), *desc)
        return ("tmp", *desc)

    def record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        flat, _ = tree_flatten((args, kwargs))
        self.log.append((name, *(self.describe(x) for x in flat)))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.record(str(func), args, kwargs)
        if func in FORBIDDEN:
            self.forbidden.append(str(func))
        if func in _INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.forbidden.append(f"{func} with a boolean mask")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.forbidden.append(f"{func} without output_size")
        out = func(*args, **kwargs)
        if self._strict:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._made.add(t.untyped_storage().data_ptr())
        return out


@contextlib.contextmanager
def recording(
    buffers: dict[str, torch.Tensor], ext: ModuleType | None = None, strict: bool = False
) -> Iterator[OpRecorder]:
    """Record the block (see the module doc); ``ext``: FreeKV's compiled ops, whose launches
    are logged too; ``strict``: log the address of every tensor read that is neither in
    ``buffers`` nor made inside the block (a graph would read it there again)."""
    rec = OpRecorder(buffers, strict)
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    def host_read(name: str, orig: Any) -> Any:
        def read(self: torch.Tensor, *a: Any) -> Any:
            rec.forbidden.append(f"Tensor.{name}")
            return orig(self, *a)

        return read

    def launch(name: str, orig: Any) -> Any:
        def call(*a: Any) -> Any:
            rec.record(f"freekv_ops.{name}", a, {})
            return orig(*a)

        return call

    try:
        for attr in _HOST_READS:
            patch(torch.Tensor, attr, host_read(attr, getattr(torch.Tensor, attr)))
        if ext is not None:
            for fn in _EXT_OPS:
                patch(ext, fn, launch(fn, getattr(ext, fn)))
        with rec:
            yield rec
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)
