"""Host KV pool: the Python face of the Rust page arena and its conversion threads.

Engine code imports from here, not from ``freekv_sglang._native``. This module

- points the Rust crate at the CUDA runtime of the installed torch (``FREEKV_CUDART``), so
  the pool pins through the same ``libcudart`` torch uses; it must run before the first pool
  is created, which importing ``freekv_sglang`` guarantees;
- re-exports the native classes and exceptions (``HostPagePool``, ``ConversionWorkers``, ...);
- adds :class:`HostKVPool`, a pool plus its worker threads with layer-level helpers, which logs
  one line when it is built: the arena's size, its device and its NUMA placement.

NUMA. The arena's pages are bound to a NUMA node before they are first touched or pinned
(``mbind``, in the Rust crate). By default (``numa="device"``) that is the node of the pool's
GPU, found through its PCI bus id, and only on a host with more than one online node, with
``MPOL_PREFERRED`` (the node first, others once it is full); a node number binds strictly
(``MPOL_BIND``), raising ``NumaNodeError`` if the node is not online and ``NumaBindError`` if
the binding fails; ``None`` leaves placement to the kernel. The pool reports the outcome
(``numa_node``, ``numa_policy``, ``numa_placement``), failures of the default included.

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

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

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
    NumaBindError,
    NumaNodeError,
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
    "NumaBindError",
    "NumaNodeError",
    "PageGeometry",
    "PoolExhaustedError",
    "StagingBuffer",
    "StaleHandleError",
    "Ticket",
    "WorkerShutdownError",
    "configure_cudart",
    "cuda_runtime_info",
    "find_cudart",
    "placement_line",
    "wait_all",
]

logger = logging.getLogger(__name__)

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


def placement_line(pool: HostPagePool) -> str:
    """One line on where ``pool``'s arena lives: size (GiB, MiB under 1 GiB), the GPU it is
    pinned for, NUMA node.

    E.g. ``FreeKV host pool: 64.00 GiB pinned for GPU 1; NUMA node 1 (GPU 1's node, PCI
    0000:3b:00.0, MPOL_PREFERRED)`` or ``...; no NUMA placement: single NUMA node``.
    """
    nbytes = pool.capacity_pages * pool.geometry.page_bytes
    size = f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
    where = f"pinned for GPU {pool.device}" if pool.is_pinned else "not pinned"
    node = pool.numa_node
    numa = (
        f"NUMA node {node} ({pool.numa_placement})"
        if node is not None
        else f"no NUMA placement: {pool.numa_placement}"
    )
    return f"FreeKV host pool: {size} {where}; {numa}"


class HostKVPool:
    """A :class:`HostPagePool` and its :class:`ConversionWorkers`, driven layer by layer.

    ``offload_layer`` converts SGLang's NHD rows of one layer into host pages;
    ``load_layer`` reads pages back as NHD rows (tests and checks; the engine reads host pages
    with the recall op).

    ``device`` is the CUDA device ordinal of the engine using the pool (default: the current
    device when pinning on CUDA, else 0). The arena is pinned and unpinned, and the workers
    wait on ``cuda_event``, with that device current on the thread making the call; the
    caller's own current device is left as it was.

    ``numa`` places the arena's pages (see the module docstring): ``"device"`` (default) the
    node of ``device`` on a multi-node host, a node number strictly, ``None`` nowhere in
    particular. The outcome is logged once, at INFO (:func:`placement_line`).
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
        numa: int | Literal["device"] | None = "device",
    ) -> None:
        if device is None:
            device = torch.cuda.current_device() if pin and torch.cuda.is_available() else 0
        self.geometry = geometry
        self.pool = HostPagePool(geometry, capacity_bytes, pin=pin, device=device, numa=numa)
        logger.info("%s", placement_line(self.pool))
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
