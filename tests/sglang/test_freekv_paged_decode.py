"""The GPU path's page-table decode (`FreeKVPagedDecode`) against the CPU path's computation on
a continuous batch.

Two runtimes see the same requests and the same K/V. The one under test is attached to SGLang's
token allocator (offloaded pages outside sink and window give their device slots back; also run
without, so that the dense layers' plan differs from the sparse layers') and attends exactly as
the FlashInfer backend does: one plan per step, three paged decodes (one table of sink, window and budget slots for the
sparse requests), host-read K/V for
dense layers. Its twin keeps every slot and attends as the CPU backend does: dense attention for
dense layers and for requests that fit, the runtime's masked torch step for requests over
budget. The batch is ragged and changes: one request crosses the budget mid-run, one leaves,
one joins with a prompt over budget. Outputs must agree at every step and layer; afterwards
every device slot and host page is back.

The geometry is one the CUDA kernels take (pages of 16 tokens). On the CPU (float32, 1e-5) the
ops and decode kernels are the plain-torch references; in the ``cpu-emulated`` case (bf16,
head dim 128, 2e-2) every op the runtimes call (select, recall, prefix load-back) runs the CUDA
kernels and launchers through the emulated build (``FREEKV_OPS=emulated``), with the arguments
the GPU path passes. On a GPU (bf16, head dim 128, 2e-2) both runtimes are on the device (pinned host pool, CUDA recall op, recall and offload
streams, event-gated conversions) and the kernels are the references again (this case needs
neither SGLang nor FlashInfer) or FlashInfer's, through the kernel set the FlashInfer backend
builds. Only the reclaim cases need SGLang (the reclaiming allocator subclasses SGLang's); the
others give the runtime under test fixed slots, as its twin has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.paged_attention import DecodeKernels, ReferenceDecodeKernels
from freekv_sglang.runtime import RECLAIMED_SLOT, FreeKVRuntime
from freekv_sglang.runtime.paged_decode import FreeKVPagedDecode
from tests.runtime.small_runtime import HQ, LAYERS, MAX_REQUESTS, D, H, sparse_step

# The references unless a case sets FREEKV_OPS itself (its cpu-emulated case).
pytestmark = pytest.mark.ops_reference

P = 16
MAX_SEQ_LEN = 512
SLOTS = 3200
KV_SLOTS = MAX_REQUESTS * MAX_SEQ_LEN + 1  # the engine buffers' token slots: both schemes fit
# Layer 0 dense, layer 1 sparse; budget 112 tokens: 16 sink + 4 selected pages of 16 + 32 window.
CFG = FreeKVConfig(
    page_size=P, sink_tokens=16, window_tokens=32, budget_tokens=112, dense_layers=(0,)
)


@dataclass(frozen=True)
class _Case:
    """Where the decode runs: device, dtype, geometry, and the tolerance its kernels allow."""

    device: str
    dtype: torch.dtype
    hq: int
    h: int
    d: int
    tol: float
    flashinfer: bool = False  # FlashInfer's kernels, else the plain-torch references
    emulated: bool = False  # the ops through the emulated CUDA build (FREEKV_OPS=emulated)

    @property
    def scale(self) -> float:
        # Not the kernels' default: a model's own softmax scale must reach every plan, the
        # single decode and the selection alike.
        return 0.8 * self.d**-0.5

    def runtime(self, regions: int | None = None, store: int | None = None) -> FreeKVRuntime:
        """A runtime over zeroed engine K/V buffers: ``KV_SLOTS`` token slots (both slot
        schemes fit), then the budget regions' rows."""
        rows = KV_SLOTS + FreeKVRuntime.region_tokens(CFG, regions or MAX_REQUESTS)
        k, v = (
            [torch.zeros(rows, self.h, self.d, dtype=self.dtype, device=self.device)
             for _ in range(LAYERS)]
            for _ in range(2)
        )  # fmt: skip
        return FreeKVRuntime(
            CFG,
            num_layers=LAYERS,
            num_q_heads=self.hq,
            num_kv_heads=self.h,
            head_dim=self.d,
            max_requests=MAX_REQUESTS,
            max_seq_len=MAX_SEQ_LEN,
            dtype=self.dtype,
            device=torch.device(self.device),
            host_pool_bytes=64 << 20,
            conversion_threads=2,
            kv_buffers=(k, v),
            region_first_slot=KV_SLOTS,
            max_sparse_requests=regions,
            dense_store_tokens=store,
        )

    def kernels(self) -> DecodeKernels:
        if not self.flashinfer:
            return ReferenceDecodeKernels()
        pytest.importorskip("flashinfer", reason="the FlashInfer case needs FlashInfer")
        from freekv_sglang.flashinfer_kernels import FlashInferDecodeKernels

        return FlashInferDecodeKernels(
            torch.zeros(128 << 20, dtype=torch.uint8, device=self.device),
            use_tensor_cores=False,
            num_qo_heads=self.hq,
            num_kv_heads=self.h,
            head_dim=self.d,
            q_dtype=self.dtype,
            kv_dtype=self.dtype,
        )

    def randn(self, *shape: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(self.device, self.dtype)


CPU = _Case("cpu", torch.float32, HQ, H, D, 1e-5)
EMULATED = _Case("cpu", torch.bfloat16, 8, 2, 128, 2e-2, emulated=True)
GPU = _Case("cuda", torch.bfloat16, 8, 2, 128, 2e-2)
GPU_FLASHINFER = _Case("cuda", torch.bfloat16, 8, 2, 128, 2e-2, flashinfer=True)


class _Pools:
    """A runtime with its K/V caches and request-to-slot table."""

    def __init__(
        self,
        case: _Case,
        alloc: Any,
        regions: int | None = None,
        store: int | None = None,
    ) -> None:
        self.rt = case.runtime(regions, store)
        self.alloc = alloc
        self.k, self.v = self.rt.regions.k_slots, self.rt.regions.v_slots
        self.table = torch.zeros(MAX_REQUESTS, MAX_SEQ_LEN, dtype=torch.int32, device=case.device)

    def slots(self, row: int, start: int, n: int) -> torch.Tensor:
        if self.alloc is not None:
            got = self.alloc.alloc(n)
            assert got is not None
        else:  # the twin: a fixed slot per (row, position), never reused
            got = row * MAX_SEQ_LEN + start + torch.arange(n) + 1
        got = got.to(self.table.device, torch.int64)
        self.table[row, start : start + n] = got.to(torch.int32)
        return got

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = k
        self.v[layer][slots] = v
        self.rt.after_kv_write(layer, self.k[layer], self.v[layer], self.table)

    def release(self, row: int, n: int) -> None:
        self.rt.release(row)
        if self.alloc is not None:
            self.alloc.free(self.table[row, :n].to(torch.int64))


def _dense(case: _Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of ``q [H_q, D]`` over all of ``k``/``v [N, H, D]`` (float32 inside)."""
    g = case.hq // case.h
    kh = k.float().permute(1, 0, 2).repeat_interleave(g, dim=0)
    vh = v.float().permute(1, 0, 2).repeat_interleave(g, dim=0)
    o = F.scaled_dot_product_attention(q.float().unsqueeze(1), kh, vh, scale=case.scale)
    return o.squeeze(1).to(q.dtype)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(CPU, id="cpu-reference"),
        pytest.param(EMULATED, id="cpu-emulated", marks=pytest.mark.slow),
        pytest.param(GPU, id="cuda-reference", marks=pytest.mark.gpu),
        pytest.param(GPU_FLASHINFER, id="cuda-flashinfer", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize("reclaim", [True, False], ids=["reclaim", "no_reclaim"])
@pytest.mark.parametrize(
    ("regions", "store"),
    [(None, None), (2, 96)],
    ids=["room_for_all", "two_regions_small_store"],
)
def test_page_table_decode_equals_cpu_path_on_a_changing_batch(
    case: _Case,
    reclaim: bool,
    regions: int | None,
    store: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if case.emulated:
        monkeypatch.setenv("FREEKV_OPS", "emulated")
    g = torch.Generator().manual_seed(0)
    h, d = case.h, case.d
    alloc = None
    if reclaim:  # without it, dense layers read every request from SGLang's pool
        pytest.importorskip("sglang", reason="the reclaiming allocator subclasses SGLang's")
        from freekv_sglang.sglang.memory import FreeKVTokenAllocator

        alloc = FreeKVTokenAllocator(SLOTS, case.dtype, case.device, None, False)
    gpu = _Pools(case, alloc, regions, store)
    if alloc is not None:
        gpu.rt.attach_allocator(alloc, gpu.table, lambda layer: (gpu.k[layer], gpu.v[layer]))
    cpu = _Pools(case, None)
    decode = FreeKVPagedDecode(gpu.rt, case.kernels())
    lens: dict[int, int] = {}
    rids: dict[int, str] = {}
    query: dict[int, torch.Tensor] = {}

    def prefill(row: int, n: int, rid: str) -> None:
        for pools in (gpu, cpu):
            slots = pools.slots(row, 0, n)
            pools.rt.begin_forward([row], [n], [rid])
            gk = torch.Generator().manual_seed(ord(rid))  # the same K/V in both pools
            for layer in range(LAYERS):
                k = case.randn(n, h, d, generator=gk)
                pools.write(layer, slots, k, case.randn(n, h, d, generator=gk))
        lens[row], rids[row] = n, rid
        query[row] = case.randn(LAYERS, case.hq, d, generator=g)

    # Row 0 fits the budget until step 4; rows 1 and 2 are over it from the start.
    prefill(0, 108, "a")
    prefill(1, 244, "b")
    prefill(2, 360, "c")
    far_seen = 0
    for step in range(10):
        if step == 4:  # row 1 leaves, row 3 joins over budget
            for pools in (gpu, cpu):
                pools.release(1, lens[1])
            del lens[1], rids[1]
            prefill(3, 180, "d")
        rows = sorted(lens)
        for r in rows:
            lens[r] += 1
        n = [lens[r] for r in rows]
        new = {r: (gpu.slots(r, lens[r] - 1, 1), cpu.slots(r, lens[r] - 1, 1)) for r in rows}
        for pools in (gpu, cpu):
            pools.rt.begin_forward(rows, n, [rids[r] for r in rows], decode=True)
        assert decode.plan(rows, n, gpu.table, case.scale)  # row 2 is sparse throughout
        far_seen += sum(gpu.rt.has_reclaimed(r) for r in rows)
        rows_t = torch.tensor(rows, device=case.device)
        lens_t = torch.tensor(n, device=case.device)
        # Sparse: over budget with a budget region; with two regions, row 3 (joining when
        # rows 0 and 2 hold them) is held dense and must attend exactly.
        over = [i for i, r in enumerate(rows) if gpu.rt.is_sparse(r)]
        assert gpu.rt.batch_sparse() == [i in over for i in range(len(rows))]
        if regions is None:
            assert over == [i for i, m in enumerate(n) if m > CFG.total_budget_tokens]
        for layer in range(LAYERS):
            k_new = case.randn(len(rows), h, d, generator=g)
            v_new = case.randn(len(rows), h, d, generator=g)
            q = torch.stack([query[r][layer] for r in rows])
            gpu.write(layer, torch.cat([new[r][0] for r in rows]), k_new, v_new)
            cpu.write(layer, torch.cat([new[r][1] for r in rows]), k_new, v_new)
            got = decode.forward(layer, q, (gpu.k[layer], gpu.v[layer]), rows_t, lens_t, gpu.table)
            want = torch.empty_like(q)
            dense_layer = CFG.is_dense_layer(layer)
            for i, r in enumerate(rows):
                if dense_layer or i not in over:
                    idx = cpu.table[r, : n[i]].to(torch.int64)
                    want[i] = _dense(case, q[i], cpu.k[layer][idx], cpu.v[layer][idx])
            if not dense_layer:
                sp = torch.tensor(over, device=case.device)
                want[sp] = sparse_step(
                    cpu.rt, layer, q[sp], rows_t[sp], lens_t[sp], cpu.k[layer], cpu.v[layer],
                    cpu.table, case.scale,
                )  # fmt: skip
            torch.testing.assert_close(got, want, rtol=case.tol, atol=case.tol)
            # No recall or offload failed (a failed one marks its requests and their budget
            # slots keep stale data; both runtimes would fail alike, so outputs alone agree).
            assert gpu.rt.failures() == {} and cpu.rt.failures() == {}, gpu.rt.failures()
        for r in rows:
            query[r] = query[r] + 0.4 * case.randn(*query[r].shape, generator=g)
    assert (far_seen > 0) == reclaim  # dense layers read host pages for those requests
    assert lens[0] > CFG.total_budget_tokens  # row 0 crossed the budget mid-run
    held = gpu.rt.stats()["held_dense_steps_total"]
    assert held == (0 if regions is None else 6), held  # row 3, steps 4 to 9
    assert gpu.rt.is_sparse(3) == (regions is None)
    # The budget slots of requests over budget were filled by recalls from the host pool.
    assert gpu.rt.stats()["pages_recalled"] > 0
    stats = gpu.rt.stats()
    for r in sorted(lens):  # sparse requests gave slots back where the dense store had room
        reclaimed = bool((gpu.table[r, : lens[r]] == RECLAIMED_SLOT).any())
        assert reclaimed == gpu.rt.has_reclaimed(r), r
        if store is None:
            assert reclaimed == (reclaim and gpu.rt.is_sparse(r)), r
    # A 96-token store (6 pages) cannot hold every reclaimed page of rows 0 and 2.
    assert (stats["reclaims_blocked_total"] > 0) == (reclaim and store is not None)
    assert stats["dense_store_pages_in_use"] == (stats["device_tokens_reclaimed"] // P)
    for r in sorted(lens):
        for pools in (gpu, cpu):
            pools.release(r, lens[r])
    if alloc is not None:
        assert alloc.available_size() == SLOTS
        assert sorted(alloc.free_pages.cpu().tolist()) == list(range(1, SLOTS + 1))
    for pools in (gpu, cpu):
        assert pools.rt.host.pool.used_pages == 0
        assert pools.rt.stats()["dense_store_pages_in_use"] == 0
        pools.rt.close()


def test_forward_without_a_plan_is_refused() -> None:
    rt = CPU.runtime()
    decode = FreeKVPagedDecode(rt, ReferenceDecodeKernels())
    table = torch.zeros(MAX_REQUESTS, MAX_SEQ_LEN, dtype=torch.int32)
    rt.begin_forward([0], [10], ["a"], decode=True)
    assert not decode.plan([0], [10], table, CPU.scale)  # fits the budget: SGLang's own decode
    kv = (torch.zeros(8, H, D), torch.zeros(8, H, D))
    with pytest.raises(RuntimeError, match="without a plan"):
        decode.forward(1, torch.zeros(1, HQ, D), kv, torch.tensor([0]), torch.tensor([10]), table)
    with pytest.raises(ValueError, match="2 rows but 1 lengths"):
        decode.plan([0, 1], [10], table, CPU.scale)
    rt.release(0)
    rt.close()
