"""The device part of FreeKV's sparse decode step is static: a CUDA graph can hold it.

A sparse decode step is host bookkeeping (the plan: regions, step buffers, attended tables,
offload waits, faults) around device work per layer (correction flags, re-selection of the
flagged heads, speculative selection, delta recall, residency and speculation updates,
counters, the attention over the attended tables). This test runs the device work of every
layer under a ``TorchDispatchMode`` that records, per op, its name and, per tensor argument,
its shape, dtype and, for a buffer that lives across steps (the runtime's state, budget slots,
digests, host pool, step buffers and tables, the engine's K/V, the plan's buffers), which
buffer and where in it. Over several steps of one batch size with different queries, different
flagged heads and different pages recalled, the recorded sequences must be identical, and no
op may read a device value on the host (``_local_scalar_dense``, ``nonzero``, boolean-mask
indexing, ``tolist``, ops whose output shape depends on values).

It runs through the ops' references and through the kernels compiled for the CPU (the
emulated build, whose launchers are recorded as one entry each), with the attention's
references (FlashInfer's kernels do not run on a CPU).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import _load
from freekv_sglang.paged_attention import ReferenceDecodeKernels
from freekv_sglang.runtime import FreeKVPagedDecode, FreeKVRuntime
from freekv_sglang.runtime import stats as stats_mod
from freekv_sglang.testing.static_ops import recording

LAYERS, HQ, H, D = 2, 4, 2, 64
P = 16
ROWS = [1, 3]
MAX_SEQ = 512
SLOTS = 2048
STEPS = 6


def _cfg(selection: str = "speculative") -> FreeKVConfig:
    # 16 sink tokens, 3 selected pages, a window of 2 pages (32 tokens): 96 tokens of budget.
    return FreeKVConfig(
        page_size=P,
        sink_tokens=16,
        window_tokens=32,
        budget_tokens=96,
        tau=0.9,
        dense_layers=(),
        selection=selection,  # type: ignore[arg-type]
    )


def _recording(named: dict[str, torch.Tensor]) -> Any:
    ext = _load.load_emulated_extension() if _load.ops_mode() == "emulated" else None
    return recording(named, ext)


def _runtime(cfg: FreeKVConfig) -> FreeKVRuntime:
    return FreeKVRuntime(
        cfg,
        num_layers=LAYERS,
        num_q_heads=HQ,
        num_kv_heads=H,
        head_dim=D,
        max_requests=4,
        max_seq_len=MAX_SEQ,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        host_pool_bytes=16 << 20,
        conversion_threads=2,
        kv_buffers=(_zeros(cfg), _zeros(cfg)),
        region_first_slot=SLOTS,
    )


def _zeros(cfg: FreeKVConfig) -> list[torch.Tensor]:
    """One layer buffer per layer: the engine's ``SLOTS`` token slots, then the regions'."""
    rows = SLOTS + FreeKVRuntime.region_tokens(cfg, 4)
    return [torch.zeros(rows, H, D, dtype=torch.bfloat16) for _ in range(LAYERS)]


def _legacy_step(
    rt: FreeKVRuntime, layer: int, q: torch.Tensor, lens: list[int], kv: Any, r2t: torch.Tensor
) -> torch.Tensor:
    """The same step through the runtime's per-call API (each phase runs its host checks)."""
    attended = ReferenceDecodeKernels().paged()
    attended.plan(rt.attended_table(ROWS, lens, r2t), D**-0.5, 0.0)
    regs, lens_t = rt.region_index(ROWS, q.device), torch.tensor(lens)
    rt.decode.correct(layer, q, regs, lens_t, D**-0.5, ROWS)
    out = attended.run(q, kv)
    rt.decode.speculate(layer, q, regs, lens_t, D**-0.5, ROWS)
    return out


def _run(
    cfg: FreeKVConfig, legacy: bool = False
) -> tuple[list[list[tuple[Any, ...]]], list[str], list[dict[str, float]], list[torch.Tensor]]:
    """Prefill two requests, then decode ``STEPS`` steps; returns each step's record, the
    forbidden reads seen, the counters after each step and each step's outputs (``legacy``:
    through the per-call API, unrecorded)."""
    g = torch.Generator().manual_seed(7)
    rt = _runtime(cfg)
    k_cache, v_cache = rt.regions.k_slots, rt.regions.v_slots  # the engine's buffers
    for t in (*k_cache, *v_cache):
        t[:SLOTS] = torch.randn(SLOTS, H, D, generator=g).to(torch.bfloat16)
    req_to_token = torch.zeros(4, MAX_SEQ, dtype=torch.int32)
    perm = (torch.randperm(SLOTS - 1, generator=g) + 1).to(torch.int32)
    for i, r in enumerate(ROWS):
        req_to_token[r, :MAX_SEQ] = perm[i * MAX_SEQ : (i + 1) * MAX_SEQ] % SLOTS
    lens = [200, 243]
    rids = ["a", "b"]
    rt.begin_forward(ROWS, lens, rids)
    for layer in range(LAYERS):
        rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)
    paged = FreeKVPagedDecode(rt, ReferenceDecodeKernels())
    scale = D**-0.5
    # What the engine keeps across steps: its query, its request rows and lengths.
    q_buf = torch.zeros(len(ROWS), HQ, D, dtype=torch.bfloat16)
    rows_buf = torch.tensor(ROWS)
    lens_buf = torch.zeros(len(ROWS), dtype=torch.int64)
    q = torch.randn(len(ROWS), HQ, D, generator=g)
    records, forbidden, counters, outputs = [], [], [], []
    for step in range(STEPS):
        lens = [n + 1 for n in lens]
        lens_buf.copy_(torch.tensor(lens))
        rt.begin_forward(ROWS, lens, rids, decode=True)
        for layer in range(LAYERS):
            slots = req_to_token[ROWS, torch.tensor(lens) - 1].to(torch.int64)
            k_cache[layer][slots] = torch.randn(2, H, D, generator=g).to(torch.bfloat16)
            v_cache[layer][slots] = torch.randn(2, H, D, generator=g).to(torch.bfloat16)
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)
        assert paged.plan(ROWS, lens, req_to_token, scale)
        # Every other step, half the query heads move far (their KV heads get flagged).
        moved = q + (3.0 if step % 2 else 0.05) * torch.randn(q.shape, generator=g)
        q = torch.where(torch.arange(HQ).view(1, HQ, 1) < HQ // 2, moved, q)
        q_buf.copy_(q.to(torch.bfloat16))
        named = {f"state.{i}": t for i, t in enumerate(stats_mod.device_tensors(rt))}
        named.update({f"k_cache.{i}": t for i, t in enumerate(k_cache)})
        named.update({f"v_cache.{i}": t for i, t in enumerate(v_cache)})
        named.update(
            host_kv=rt.offload.host_kv, q=q_buf, rows=rows_buf, lens=lens_buf,
            req_to_token=req_to_token,
        )  # fmt: skip
        # The plan's buffers: the batch indices, the reference decode's gather plans.
        named.update({f"index.{k}": t for k, t in getattr(paged, "_index", {}).items()})
        for attr in ("_ok", "_flat"):
            if getattr(paged._attended, attr, None) is not None:
                named[f"attended.{attr}"] = getattr(paged._attended, attr)
        if legacy:
            for layer in range(LAYERS):
                kv = (k_cache[layer], v_cache[layer])
                outputs.append(_legacy_step(rt, layer, q_buf, lens, kv, req_to_token))
        else:
            with _recording(named) as rec:
                for layer in range(LAYERS):
                    kv = (k_cache[layer], v_cache[layer])
                    o = paged.forward(layer, q_buf, kv, rows_buf, lens_buf, req_to_token)
                    outputs.append(o)
            records.append(rec.log)
            forbidden.extend(rec.forbidden)
        counters.append(rt.state.counters())
    for r in ROWS:
        rt.release(r)
    rt.close()
    return records, forbidden, counters, outputs


@pytest.mark.parametrize("ops", ["reference", "emulated"])
@pytest.mark.parametrize("selection", ["speculative", "current"])
def test_sparse_step_is_static(ops: str, selection: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEKV_OPS", ops)
    records, forbidden, counters, _ = _run(_cfg(selection))
    assert forbidden == []
    assert records[0], "nothing was recorded"
    if ops == "emulated":
        launches = [e[0] for e in records[0] if str(e[0]).startswith("freekv_ops.")]
        assert "freekv_ops.select_pages" in launches and "freekv_ops.recall_direct" in launches
    for i, rec in enumerate(records[1:], start=1):
        assert len(rec) == len(records[0]), f"step {i}: {len(rec)} ops, step 0 {len(records[0])}"
        for j, (a, b) in enumerate(zip(records[0], rec, strict=True)):
            assert a == b, f"step {i}, op {j}: {b} differs from step 0's {a}"
    # The steps differed: pages were recalled at several steps and, speculating, corrections
    # happened at some steps and not at others.
    recalled = [c["pages_recalled"] for c in counters]
    assert len({b - a for a, b in itertools.pairwise(recalled)}) > 1
    if selection == "speculative":
        corr = [c["corrections"] for c in counters]
        deltas = [b - a for a, b in itertools.pairwise(corr)]
        assert any(d > 0 for d in deltas) and any(d == 0 for d in deltas)


@pytest.mark.parametrize("window_pages", [1, 2])
def test_the_prepared_step_equals_the_per_call_api(
    window_pages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step prepared once per batch gives the outputs and counters of the per-call API,
    bit for bit; with one window page its host checks stay in each layer's step (a page that
    fills can be chosen by the next speculation), with two they run in the plan."""
    monkeypatch.setenv("FREEKV_OPS", "reference")
    w = window_pages * P
    cfg = FreeKVConfig(
        page_size=P, sink_tokens=16, window_tokens=w, budget_tokens=16 + 3 * P + w,
        tau=0.9, dense_layers=(),
    )  # fmt: skip
    _, _, c_step, o_step = _run(cfg)
    _, _, c_call, o_call = _run(cfg, legacy=True)
    assert c_step == c_call
    assert c_step[-1]["pages_recalled"] > 0 and c_step[-1]["corrections"] > 0
    for a, b in zip(o_step, o_call, strict=True):
        assert torch.equal(a, b)


def test_the_recorder_sees_a_host_read() -> None:
    """The recorder is not blind: what today's main did in its step (a boolean-mask gather and a
    ``tolist`` of its rows) is reported."""
    x = torch.arange(6)
    with _recording({"x": x}) as rec:
        y = x[x > 2]
        y.tolist()
        int(x.sum())
    assert any("boolean mask" in f for f in rec.forbidden)
    assert "Tensor.tolist" in rec.forbidden
    assert "aten._local_scalar_dense.default" in rec.forbidden
