"""Host KV pool: the Python face of the Rust page arena and its conversion threads.

Engine code imports from here, not from ``freekv_sglang._native``. This module

- points the Rust crate at the CUDA runtime of the installed torch (``FREEKV_CUDART``), so
  the pool pins through the same ``libcudart`` torch uses; it must run before the first pool
  is created, which importing ``freekv_sglang`` guarantees;
- re-exports the native classes and exceptions (``HostPagePool``, ``ConversionWorkers``, ...);
- adds :class:`HostKVPool`, a pool plus its worker threads with layer-level helpers.

Threads and ownership. A :class:`HostKVPool` is created and used by one engine thread (the
scheduler). Its ``ConversionWorkers`` run the copies on their own threads; every submit
returns a ``Ticket``, and a page layer written by a job must not be read (through
``arena_view``/``page_view`` or another job) until that ticket is done. Source tensors are kept
alive by the job; the caller must not write them until the ticket is done. ``close()`` drains
the queue and joins the threads; the arena is unmapped (and unpinned first) when the last
reference to the pool, including any tensor view of it, goes away.

Processes. Worker threads do not survive ``fork``: create pools and workers in the process that
uses them (SGLang's scheduler subprocess, which is spawned), never before a fork. Dropping a
``ConversionWorkers`` drains its queue and joins its threads while holding the GIL; call
``close()`` (which releases the GIL) to control when that happens.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from freekv_sglang._native import (
    AllocationError,
    ConversionWorkers,
    CudaError,
    FreeKVError,
    HostPagePool,
    InvalidGeometryError,
    InvariantViolationError,
    JobFailedError,
    LayoutMismatchError,
    PageGeometry,
    PoolExhaustedError,
    StagingBuffer,
    StaleHandleError,
    Ticket,
    WorkerShutdownError,
    cuda_runtime_info,
    wait_all,
)

__all__ = [
    "AllocationError",
    "ConversionWorkers",
    "CudaError",
    "FreeKVError",
    "HostKVPool",
    "HostPagePool",
    "InvalidGeometryError",
    "InvariantViolationError",
    "JobFailedError",
    "LayoutMismatchError",
    "PageGeometry",
    "PoolExhaustedError",
    "StagingBuffer",
    "StaleHandleError",
    "Ticket",
    "WorkerShutdownError",
    "configure_cudart",
    "cuda_runtime_info",
    "find_cudart",
    "wait_all",
]

# Where pip's CUDA runtime wheels put libcudart: CUDA 13 (nvidia-cuda-runtime 13.x) and 12.
_CUDART_GLOBS = ("nvidia/cu13/lib/libcudart.so*", "nvidia/cuda_runtime/lib/libcudart.so*")


def find_cudart(search_path: Sequence[str] | None = None) -> str | None:
    """Path of the pip-installed ``libcudart`` shared library, or None.

    Looks in ``search_path`` (default ``sys.path``) for the CUDA 13 wheel layout first, then
    CUDA 12's; static archives are skipped.
    """
    for pattern in _CUDART_GLOBS:
        for entry in search_path if search_path is not None else sys.path:
            root = Path(entry)
            if not root.is_dir():
                continue
            for lib in sorted(root.glob(pattern)):
                if lib.is_file() and ".so" in lib.name:
                    return str(lib)
    return None


def configure_cudart() -> str | None:
    """Set ``FREEKV_CUDART`` to :func:`find_cudart`'s answer unless it is already set.

    Returns the value in effect. Without a CUDA runtime the pool still works, unpinned.
    """
    current = os.environ.get("FREEKV_CUDART")
    if current:
        return current
    found = find_cudart()
    if found is not None:
        os.environ["FREEKV_CUDART"] = found
    return found


configure_cudart()


class HostKVPool:
    """A :class:`HostPagePool` and its :class:`ConversionWorkers`, driven layer by layer.

    ``offload_layer`` converts SGLang's NHD rows of one layer into host pages;
    ``load_layer`` reads pages back as NHD rows (tests and checks; the engine reads host pages
    with the recall op).

    ``device`` is the CUDA device ordinal of the engine using the pool (default: the current
    device when pinning on CUDA, else 0). The arena is pinned and unpinned, and the workers
    wait on ``cuda_event``, with that device current on the thread making the call; the
    caller's own current device is left as it was.
    """

    def __init__(
        self,
        geometry: PageGeometry,
        capacity_bytes: int,
        *,
        pin: bool = True,
        num_threads: int | None = None,
        queue_depth: int = 1024,
        device: int | None = None,
    ) -> None:
        if device is None:
            device = torch.cuda.current_device() if pin and torch.cuda.is_available() else 0
        self.geometry = geometry
        self.pool = HostPagePool(geometry, capacity_bytes, pin=pin, device=device)
        self.workers = ConversionWorkers(self.pool, num_threads, queue_depth)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the pool's pages."""
        dtype = getattr(torch, self.geometry.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def offload_layer(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        page_ids: Sequence[int],
        cuda_event: int | None = None,
    ) -> Ticket:
        """Queue NHD ``k``/``v`` (``[tokens, heads, dim]``) into ``layer`` of ``page_ids``."""
        return self.workers.submit_nhd_to_hnd(layer, k, v, list(page_ids), cuda_event)

    def load_layer(
        self, layer: int, page_ids: Sequence[int], num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ``num_tokens`` tokens of ``layer`` from ``page_ids`` as NHD K and V (blocking)."""
        shape = (num_tokens, self.geometry.num_kv_heads, self.geometry.head_dim)
        k = torch.empty(shape, dtype=self.dtype)
        v = torch.empty(shape, dtype=self.dtype)
        self.workers.submit_hnd_to_nhd(layer, list(page_ids), k, v).wait()
        return k, v

    def close(self, cancel_pending: bool = False) -> None:
        """Stop the worker threads (drain by default). The arena lives on while referenced."""
        self.workers.shutdown(cancel_pending)

    def __enter__(self) -> HostKVPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(cancel_pending=exc is not None)
