"""Recall (host pool -> GPU buffers), with a pure-torch reference of the same signature.

Layouts (see ``cuda/include/freekv/layout.cuh``):

- ``host_kv``: ``[num_host_pages, L, H, 2, p, D]`` pinned CPU tensor, HND per (page, layer):
  one (page, layer, head) chunk of K then V is contiguous (the Rust pool's ``arena_view()``,
  or any pinned tensor of that layout);
- ``k_buffers`` / ``v_buffers``: one ``[num_slots, H, D]`` tensor per layer (SGLang's MHA pool,
  NHD, FlashInfer page size 1); a recalled page lands in ``p`` consecutive token slots;
- work rows: ``[W, 4]`` int32 ``(host_page, layer, head, slot)``: copy the chunk
  ``host_kv[host_page, layer, head]`` into token slots ``[slot, slot + p)`` of head ``head``
  of layer ``layer``; a row with ``host_page < 0`` is padding (skipped).

The work list contract (between `freekv_sglang.ops.select.select_pages`, which writes it, and
`recall_direct`, which reads it; the one definition):

- the list is fixed-size and padded: for ``B`` requests, ``H`` KV heads and ``S`` budget slots
  it has exactly ``B * H * S`` rows, one per (request ``b``, KV head ``h``, budget slot ``s``),
  at row ``(b * H + h) * S + s``;
- the row of a slot that receives a page holds ``(host_page, layer, h, slot_tokens[s])`` with
  ``0 <= host_page < N`` (``N`` = the host pool's pages); the row of a slot that keeps its page
  is ``-1`` in all four fields;
- no count travels with the list: `recall_direct` processes every row and skips those with
  ``host_page < 0``. Its grid is sized by the number of rows, so nothing is read back to the
  host, and a step that moves no page costs one pass over padding rows.

`recall_direct` takes any work list of this row format (rows in range, no two rows writing the
same (slot, head)), not only the select op's.

Streams and events: the op runs on the caller's current stream (the recall stream in the
engine). On CUDA the wrapper returns a ``torch.cuda.Event`` recorded on that stream right after
the copy: the consumer (the attention of the layer) calls ``event.wait()`` on its own stream,
so no host synchronisation happens. On CPU it returns ``None`` (the copy is done).

Blocks: the kernel reads mapped host memory, so a few blocks with enough loads in flight keep
PCIe busy, and every block more holds an SM's slots that the compute the recall should hide
behind needs (the speculative recall runs beside the next layers' GEMMs and attention). The
grid is ``ctas`` blocks, grid-stride over the rows: by default `recall_ctas` of the device,
``FREEKV_RECALL_CTAS`` overriding it.

Why one direct kernel: `select_pages` writes the work list on the device, and
``recall_direct`` reads it there and pulls the chunks from mapped host memory, so nothing
crosses back to the host. A copy-engine recall would have to issue its copies from the host,
which means reading the work list back to the host, and waiting for it, at every decode step.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from freekv_sglang.ops._load import extension_for

__all__ = ["RECALL_CTAS_PER_SM", "recall_ctas", "recall_direct", "recall_direct_reference"]

# Default blocks of the recall kernel per SM of the device. On an H200 (132 SMs, 16 KiB chunks,
# 128 threads of 8 x 16 B loads each), 16 blocks already move 92% of the pinned copy peak,
# 8 blocks 74%; a quarter per SM (33 there) leaves twice that margin and the other SMs to the
# compute (benchmarks/gpu_check.py's recall block sweep; benchmarks/README.md).
RECALL_CTAS_PER_SM = 0.25
# Blocks of the emulated build on the CPU (a correctness run: any count covers every row).
_EMULATED_CTAS = 8


def recall_ctas(device: torch.device) -> int:
    """Blocks of the recall kernel on ``device``: ``FREEKV_RECALL_CTAS`` when set (a positive
    integer, else ValueError), else ``RECALL_CTAS_PER_SM`` per SM (at least 1)."""
    env = os.environ.get("FREEKV_RECALL_CTAS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if not 1 <= n <= 65535:
            raise ValueError(f"FREEKV_RECALL_CTAS must be an integer in [1, 65535], got {env!r}")
        return n
    if device.type != "cuda":
        return _EMULATED_CTAS
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, round(RECALL_CTAS_PER_SM * sms))


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _event(like: Tensor) -> torch.cuda.Event | None:
    """An event recorded on the current stream after a launch on ``like``'s device; ``None``
    for the emulated build on the CPU, whose launches complete before they return."""
    if not like.is_cuda:
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _check_layer_buffers(host_kv: Tensor, k_buffers: list[Tensor], v_buffers: list[Tensor]) -> None:
    """The buffer contract of the recall launcher with a host pool (``cuda/csrc/checks.h:
    layer_kv`` and the layer count), with its messages."""
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
    k_buffers: list[Tensor],
    v_buffers: list[Tensor],
) -> None:
    """Reference of `recall_direct`. It refuses what the launcher refuses (a buffer list per
    host layer of one shape) and, like the kernel, reads no value of ``work`` on the host: every
    row is processed with fixed shapes, so its op sequence does not depend on the rows (a CUDA
    graph could record it; the decode step's static-step test checks it).

    Each row's ``p`` destinations (token slot, head) index a flat view of its layer's buffers.
    A map over those destinations names the row that writes each one (contract: at most one);
    every row then writes, at its destinations, the winner's chunk, or the current value where
    no row wins. Padding rows aim at destination 0, so all writes to one place carry the same
    value and the result is exact whatever the write order."""
    _check_layer_buffers(host_kv, k_buffers, v_buffers)
    n_pages, n_layers, h, _, p, d = host_kv.shape
    w = work.to(torch.int64)
    valid = w[:, 0] >= 0
    hp, lay, head, slot = (w[:, i] for i in range(4))
    # The chunks of every row (padding rows read page 0; their values are never used).
    idx = [
        x.clamp(0, m - 1).to(host_kv.device) for x, m in ((hp, n_pages), (lay, n_layers), (head, h))
    ]
    chunks = host_kv[idx[0], idx[1], idx[2]]  # [W, 2, p, D]
    rows = w.shape[0] * p
    groups: dict[tuple[int, int], list[int]] = {}
    for layer, (kb, vb) in enumerate(zip(k_buffers, v_buffers, strict=True)):
        groups.setdefault((id(kb), id(vb)), []).append(layer)
    t = torch.arange(p, device=work.device)
    for layers in groups.values():
        kb, vb = k_buffers[layers[0]], v_buffers[layers[0]]
        dev = kb.device
        mine = valid
        if len(layers) < n_layers:  # only rows naming one of these layers
            mine = valid & functools.reduce(torch.logical_or, [lay == x for x in layers])
        dest = (slot.unsqueeze(1) + t) * h + head.unsqueeze(1)  # [W, p] in the flat view
        size = kb.shape[0] * h
        mine_p = mine.unsqueeze(1).expand(-1, p).reshape(-1).to(dev)
        dest = dest.reshape(-1).to(dev)
        winner = torch.full((size + 1,), -1, dtype=torch.int64, device=dev)
        winner.scatter_(0, torch.where(mine_p, dest, size), torch.arange(rows, device=dev))
        at = torch.where(mine_p, dest, 0)
        src = winner[at]
        has = (src >= 0).unsqueeze(1)
        for buf, part in ((kb, 0), (vb, 1)):
            flat = buf.view(size, d)
            vals = chunks[:, part].reshape(rows, d).to(dev)
            flat.index_copy_(0, at, torch.where(has, vals[src.clamp(min=0)], flat[at]))


def recall_direct(
    host_kv: Tensor,
    work: Tensor,
    k_buffers: list[Tensor],
    v_buffers: list[Tensor],
    ctas: int | None = None,
) -> torch.cuda.Event | None:
    """Copy the chunk of every work row with ``host_page >= 0`` from ``host_kv`` into the NHD
    buffers (the work list contract: this module's docstring).

    Args:
        host_kv: ``[num_host_pages, L, H, 2, p, D]`` pinned, 16-bit dtype.
        work: ``[W, 4]`` int32 on the buffers' device; every row is processed, rows with
            ``host_page < 0`` are skipped. Rows must be in range (the select op writes them
            so); two rows must not write the same (slot, head).
        k_buffers, v_buffers: ``L`` tensors ``[num_slots, H, D]``.
        ctas: blocks of the kernel, in ``[1, 65535]`` (default: `recall_ctas`); the result
            does not depend on it.

    Returns:
        An event recorded on the current stream after the copy (CUDA), else ``None``.
    """
    if ctas is not None and not 1 <= ctas <= 65535:
        raise ValueError(f"ctas (blocks of the recall kernel) must be in [1, 65535], got {ctas}")
    ext = extension_for(work, *k_buffers, *v_buffers)
    if ext is None:
        recall_direct_reference(host_kv, work, k_buffers, v_buffers)
        return None
    n = recall_ctas(work.device) if ctas is None else ctas
    ext.recall_direct(host_kv, work, k_buffers, v_buffers, n)
    return _event(k_buffers[0])
