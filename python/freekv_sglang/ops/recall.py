"""Recall (host pool -> GPU buffers) and offload (GPU buffers -> host), with pure-torch
references of the same signatures.

Layouts (see ``cuda/include/freekv/layout.cuh``):

- ``host_kv``: ``[num_host_pages, L, H, 2, p, D]`` pinned CPU tensor, HND per (page, layer):
  one (page, layer, head) chunk of K then V is contiguous (the Rust pool's ``arena_view()``,
  or any pinned tensor of that layout);
- ``k_buffers`` / ``v_buffers``: one ``[num_slots, H, D]`` tensor per layer (SGLang's MHA pool,
  NHD, FlashInfer page size 1); a page occupies ``p`` consecutive token slots;
- recall work rows: ``[N, 4]`` int32 ``(host_page, layer, head, slot)``, ``host_page < 0`` is
  padding (skipped); offload work rows: ``[N, 3]`` int32 ``(slot, host_page, layer)``.

Streams and events: every op runs on the caller's current stream (the recall stream in the
engine). On CUDA the wrappers return a ``torch.cuda.Event`` recorded on that stream right after
the copy: the consumer (the attention of the layer) calls ``event.wait()`` on its own stream,
so no host synchronisation happens. On CPU they return ``None`` (the copy is done).

Variants: ``recall_direct`` (a) keeps the work list on the device (as `select_pages` writes
it) and one kernel reads mapped host memory; ``recall_staged`` (b) is the paper's double-
buffered copy-engine path and needs the work list on the host. ``offload_direct`` writes the
HND host page from a kernel; ``offload_staged`` copies the NHD pages into pinned staging with
the copy engine, for the Rust conversion threads. ``benchmarks/gpu_check.py`` measures both of
each pair; the engine uses whichever measured faster.
"""

from __future__ import annotations

import torch
from torch import Tensor

from freekv_sglang.ops._load import extension_for

__all__ = [
    "offload_direct",
    "offload_direct_reference",
    "offload_staged",
    "offload_staged_reference",
    "recall_direct",
    "recall_direct_reference",
    "recall_staged",
    "recall_staged_reference",
]


def _event(like: Tensor) -> torch.cuda.Event | None:
    """An event recorded on the current stream after a launch on ``like``'s device; ``None``
    for the emulated build on the CPU, whose launches complete before they return."""
    if not like.is_cuda:
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _valid_rows(work: Tensor, num_work: Tensor | None) -> Tensor:
    w = work.to("cpu", torch.int64)
    if num_work is not None:
        w = w[: min(int(num_work.reshape(-1)[0].item()), w.shape[0])]
    return w[w[:, 0] >= 0]


def _check_layer_buffers(host_kv: Tensor, k_buffers: list[Tensor], v_buffers: list[Tensor]) -> None:
    """The buffer contract of the recall and offload launchers with a host pool
    (``cuda/csrc/checks.h: layer_kv`` and the layer count), with their messages."""
    if not k_buffers:
        raise RuntimeError("k_buffers must hold one tensor per layer, got none")
    if len(k_buffers) != len(v_buffers):
        raise RuntimeError(
            f"k_buffers and v_buffers must have one tensor per layer each, got "
            f"{len(k_buffers)} and {len(v_buffers)}"
        )
    want = (k_buffers[0].shape[0], host_kv.shape[2], host_kv.shape[5])
    for name, bufs in (("k_buffers", k_buffers), ("v_buffers", v_buffers)):
        for i, x in enumerate(bufs):
            if tuple(x.shape) != want:
                raise RuntimeError(
                    f"{name}[{i}] must have shape [{want[0]}, {want[1]}, {want[2]}], got "
                    f"[{', '.join(map(str, x.shape))}]"
                )
    if host_kv.shape[1] != len(k_buffers):
        raise RuntimeError(
            f"host_kv.size(1) ({host_kv.shape[1]} layers) must equal len(k_buffers) "
            f"({len(k_buffers)})"
        )


def recall_direct_reference(
    host_kv: Tensor,
    work: Tensor,
    num_work: Tensor | None,
    k_buffers: list[Tensor],
    v_buffers: list[Tensor],
) -> None:
    """Reference of `recall_direct` (synchronous; reads ``work`` on the host). It refuses what
    the launcher refuses: a buffer list per host layer of one shape."""
    _check_layer_buffers(host_kv, k_buffers, v_buffers)
    w = _valid_rows(work, num_work)
    p = host_kv.shape[4]
    t = torch.arange(p)
    for layer in w[:, 1].unique().tolist():
        rows = w[w[:, 1] == layer]
        chunks = host_kv[rows[:, 0], layer, rows[:, 2]]  # [m, 2, p, D]
        slots = (rows[:, 3:4] + t).reshape(-1)
        heads = rows[:, 2:3].expand(-1, p).reshape(-1)
        dev = k_buffers[layer].device
        k_buffers[layer][slots.to(dev), heads.to(dev)] = (
            chunks[:, 0].reshape(-1, chunks.shape[-1]).to(dev)
        )
        v_buffers[layer][slots.to(dev), heads.to(dev)] = (
            chunks[:, 1].reshape(-1, chunks.shape[-1]).to(dev)
        )


def recall_direct(
    host_kv: Tensor,
    work: Tensor,
    num_work: Tensor | None,
    k_buffers: list[Tensor],
    v_buffers: list[Tensor],
) -> torch.cuda.Event | None:
    """Variant (a): copy every valid work row's chunk from ``host_kv`` into the NHD buffers.

    Args:
        host_kv: ``[num_host_pages, L, H, 2, p, D]`` pinned, 16-bit dtype.
        work: ``[N, 4]`` int32 on the buffers' device; rows at or beyond ``num_work`` and rows
            with ``host_page < 0`` are skipped. Rows must be in range (the select op writes
            them so); two rows must not write the same (slot, head).
        num_work: optional ``[1]`` int32 on the device: the number of leading rows to use.
        k_buffers, v_buffers: ``L`` tensors ``[num_slots, H, D]``.

    Returns:
        An event recorded on the current stream after the copy (CUDA), else ``None``.
    """
    ext = extension_for(work, *k_buffers, *v_buffers)
    if ext is None:
        recall_direct_reference(host_kv, work, num_work, k_buffers, v_buffers)
        return None
    ext.recall_direct(host_kv, work, num_work, k_buffers, v_buffers)
    return _event(k_buffers[0])


def recall_staged_reference(
    host_kv: Tensor,
    work_host: Tensor,
    k_buffers: list[Tensor],
    v_buffers: list[Tensor],
    staging: Tensor,
) -> None:
    """Reference of `recall_staged` (``staging`` is not used)."""
    _check_layer_buffers(host_kv, k_buffers, v_buffers)
    del staging
    recall_direct_reference(host_kv, work_host, None, k_buffers, v_buffers)


def recall_staged(
    host_kv: Tensor,
    work_host: Tensor,
    k_buffers: list[Tensor],
    v_buffers: list[Tensor],
    staging: Tensor,
) -> torch.cuda.Event | None:
    """Variant (b): double-buffered copy-engine recall.

    Args:
        host_kv: as in `recall_direct`.
        work_host: ``[N, 4]`` int32 CPU tensor (rows validated on the host).
        k_buffers, v_buffers: as in `recall_direct`.
        staging: ``[2, C, 2, p, D]`` device tensor of the KV dtype: two staging buffers of
            ``C`` chunks each (the batch size of the pipeline). It must not be used by
            anything else until the returned event has completed.
    """
    ext = extension_for(staging, *k_buffers, *v_buffers)
    if ext is None:
        recall_staged_reference(host_kv, work_host, k_buffers, v_buffers, staging)
        return None
    ext.recall_staged(host_kv, work_host, k_buffers, v_buffers, staging)
    return _event(k_buffers[0])


def offload_direct_reference(
    k_buffers: list[Tensor], v_buffers: list[Tensor], work: Tensor, host_kv: Tensor
) -> None:
    """Reference of `offload_direct`."""
    _check_layer_buffers(host_kv, k_buffers, v_buffers)
    w = work.to("cpu", torch.int64)
    w = w[w[:, 1] >= 0]
    p = host_kv.shape[4]
    t = torch.arange(p)
    for slot, page, layer in w.tolist():
        idx = (slot + t).to(k_buffers[layer].device)
        # [p, H, D] -> [H, p, D]
        host_kv[page, layer, :, 0] = k_buffers[layer][idx].transpose(0, 1).cpu()
        host_kv[page, layer, :, 1] = v_buffers[layer][idx].transpose(0, 1).cpu()


def offload_direct(
    k_buffers: list[Tensor], v_buffers: list[Tensor], work: Tensor, host_kv: Tensor
) -> torch.cuda.Event | None:
    """Write whole pages (all heads) from the NHD buffers into the HND host pool.

    Args:
        k_buffers, v_buffers: ``L`` tensors ``[num_slots, H, D]``.
        work: ``[N, 3]`` int32 ``(slot, host_page, layer)`` on the buffers' device.
        host_kv: ``[num_host_pages, L, H, 2, p, D]`` pinned; the host may read the pages once
            the returned event has completed.
    """
    ext = extension_for(work, *k_buffers, *v_buffers)
    if ext is None:
        offload_direct_reference(k_buffers, v_buffers, work, host_kv)
        return None
    ext.offload_direct(k_buffers, v_buffers, work, host_kv)
    return _event(k_buffers[0])


def offload_staged_reference(
    k_buffers: list[Tensor], v_buffers: list[Tensor], work_host: Tensor, staging_host: Tensor
) -> None:
    """Reference of `offload_staged`."""
    p = staging_host.shape[2]
    t = torch.arange(p)
    for i, (slot, page, layer) in enumerate(work_host.to(torch.int64).tolist()):
        if page < 0:
            continue
        idx = (slot + t).to(k_buffers[layer].device)
        staging_host[i, 0] = k_buffers[layer][idx].cpu()
        staging_host[i, 1] = v_buffers[layer][idx].cpu()


def offload_staged(
    k_buffers: list[Tensor], v_buffers: list[Tensor], work_host: Tensor, staging_host: Tensor
) -> torch.cuda.Event | None:
    """Copy-engine offload of NHD pages into pinned staging (row ``i`` of ``work_host`` goes
    to ``staging_host[i]``, ``[2, p, H, D]``: K then V), for the host conversion threads.

    Args:
        work_host: ``[N, 3]`` int32 CPU ``(slot, host_page, layer)``; ``host_page < 0`` skips.
        staging_host: ``[N, 2, p, H, D]`` pinned CPU tensor of the KV dtype.
    """
    ext = extension_for(*k_buffers, *v_buffers)
    if ext is None:
        offload_staged_reference(k_buffers, v_buffers, work_host, staging_host)
        return None
    ext.offload_staged(k_buffers, v_buffers, work_host, staging_host)
    return _event(k_buffers[0])
