"""Failed offload and recall jobs fail their requests, not the process or the pools.

``FREEKV_FAULTS`` injects the failure (the Rust workers' failure hook for a conversion job, a
raised error for a recall). The runtime must report the affected requests through
:meth:`~freekv_sglang.runtime.FreeKVRuntime.failures` (the scheduler hook aborts them
with that message), keep serving the others, and free every page on release.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.ops import recall as recall_mod
from freekv_sglang.ops import select as select_mod
from freekv_sglang.runtime import FaultPlan, FreeKVRuntime
from tests.runtime.small_runtime import HQ, LAYERS, D, H, small_runtime, sparse_step

# Tiny shapes (head dim 8, pages of 4) in float32: the ops' references, whatever FREEKV_OPS says.
pytestmark = pytest.mark.ops_reference

P = 4
SLOTS = 1024
CFG = FreeKVConfig(page_size=P, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=())


def _run(
    rows: list[int],
    lens0: list[int],
    steps: int,
    cfg: FreeKVConfig = CFG,
    head_dim: int = D,
    dtype: torch.dtype = torch.float32,
) -> tuple[FreeKVRuntime, list, int]:
    """Prefill ``rows`` then decode ``steps`` steps; returns the runtime (open), the failures
    seen after each step and the number of outputs that were not finite."""
    g = torch.Generator().manual_seed(0)
    rt = small_runtime(cfg, head_dim=head_dim, dtype=dtype)
    k_cache = [torch.randn(SLOTS, H, head_dim, generator=g).to(dtype) for _ in range(LAYERS)]
    v_cache = [torch.randn(SLOTS, H, head_dim, generator=g).to(dtype) for _ in range(LAYERS)]
    table = torch.zeros(4, 256, dtype=torch.int32)
    perm = torch.randperm(SLOTS - 1, generator=g) + 1
    for i, r in enumerate(rows):
        table[r, :200] = perm[i * 200 : (i + 1) * 200].to(torch.int32)
    rids = [f"r{r}" for r in rows]
    # One prefill forward per request, so that each offload job belongs to one request.
    for r, n, rid in zip(rows, lens0, rids, strict=True):
        rt.begin_forward([r], [n], [rid])
        for layer in range(LAYERS):
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], table)
    rows_t = torch.tensor(rows)
    lens = torch.tensor(lens0)
    q = torch.randn(len(rows), HQ, head_dim, generator=g).to(dtype)
    seen, bad = [], 0
    for _ in range(steps):
        lens = lens + 1
        rt.begin_forward(rows, lens.tolist(), rids, decode=True)
        for layer in range(LAYERS):
            out = sparse_step(
                rt, layer, q, rows_t, lens, k_cache[layer], v_cache[layer], table, head_dim**-0.5
            )
            bad += int((~torch.isfinite(out)).sum())
        seen.append(rt.failures())
    return rt, seen, bad


def _finish(rt: FreeKVRuntime, rows: list[int]) -> None:
    for r in rows:
        rt.release(r)
    assert rt.host.pool.used_pages == 0
    rt.host.pool.check_invariants()
    assert rt.failures() == {}
    rt.close()


@pytest.mark.parametrize("spec", ["conversion:3", "conversion@r3"], ids=["by_count", "by_rid"])
def test_failed_conversion_fails_only_its_request(
    spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offload jobs: r1 layer 0, r1 layer 1, r3 layer 0, ... The third one, r3's first, fails.
    monkeypatch.setenv("FREEKV_FAULTS", spec)
    rt, seen, bad = _run([1, 3], [50, 71], 3)
    assert bad == 0
    assert set(seen[0]) == {"r3"}
    assert "offload of layer 0 failed" in seen[0]["r3"]
    rt.clear_failure("r3")
    assert rt.failures() == {}
    _finish(rt, [1, 3])


def test_failed_recall_fails_the_requests_it_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEKV_FAULTS", "recall:1")
    rt, seen, bad = _run([0, 2], [60, 60], 2)
    assert bad == 0
    assert set(seen[0]) == {"r0", "r2"}
    assert all("recall into layer 0 failed" in m for m in seen[0].values())
    # Unless the scheduler clears them, failures stay reported until the requests leave.
    assert set(seen[1]) == {"r0", "r2"}
    _finish(rt, [0, 2])


def _counting(mod: ModuleType, compiled: list[str]) -> Callable[..., ModuleType | None]:
    """``mod.extension_for`` that notes each call answered by a compiled extension."""
    inner = mod.extension_for

    def extension_for(*tensors: torch.Tensor) -> ModuleType | None:
        ext = inner(*tensors)
        if ext is not None:
            compiled.append(mod.__name__.rsplit(".", 1)[-1])
        return ext

    return extension_for


#: The kernels' geometry (what the launchers take): pages of 16, 64 dims, bfloat16.
KERNEL_CFG = FreeKVConfig(
    page_size=16, sink_tokens=16, window_tokens=32, budget_tokens=96, dense_layers=()
)


@pytest.mark.parametrize(
    ("ops", "cfg", "head_dim", "dtype"),
    [
        ("reference", CFG, D, torch.float32),
        ("reference", KERNEL_CFG, 64, torch.bfloat16),
        ("emulated", KERNEL_CFG, 64, torch.bfloat16),
    ],
    ids=["reference-d8", "reference-d64", "emulated-d64"],
)
def test_recall_fault_by_rid_fails_only_that_request_of_the_batch(
    ops: str,
    cfg: FreeKVConfig,
    head_dim: int,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both requests share every batched recall; ``recall@r2`` names one of them: it alone
    fails, the other keeps decoding with finite outputs (through the ops' references and,
    at the kernels' geometry, through the CUDA kernels' emulated build)."""
    monkeypatch.setenv("FREEKV_OPS", ops)
    monkeypatch.setenv("FREEKV_FAULTS", "recall@r2")
    compiled: list[str] = []  # the ops that ran through a compiled extension
    for mod in (select_mod, recall_mod):
        monkeypatch.setattr(mod, "extension_for", _counting(mod, compiled))
    rt, seen, bad = _run([0, 2], [150, 170], 2, cfg, head_dim, dtype)
    if ops == "emulated":
        assert {"select", "recall"} <= set(compiled), compiled
    else:
        assert compiled == []
    assert bad == 0
    assert set(seen[0]) == {"r2"} and set(seen[1]) == {"r2"}
    assert "recall into layer 0 failed" in seen[0]["r2"]
    rt.clear_failure("r2")
    assert rt.failures() == {}
    _finish(rt, [0, 2])


def test_fault_victims_are_the_named_requests_or_the_whole_operation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FREEKV_FAULTS", "recall@v,conversion:2")
    plan = FaultPlan.from_env()
    assert plan.victims("recall", ["a", "v1", "b", "v2"]) == ["v1", "v2"]
    assert plan.victims("recall", ["v1", "a"]) == []  # once per request
    assert plan.victims("conversion", ["a", "b"]) == []
    assert plan.victims("conversion", ["a", "b"]) == ["a", "b"]  # the 2nd job: all it served


def test_no_faults_means_no_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FREEKV_FAULTS", raising=False)
    rt, seen, bad = _run([0, 1], [45, 66], 3)
    assert bad == 0 and all(s == {} for s in seen)
    _finish(rt, [0, 1])


def test_fault_for_one_rank_is_injected_by_that_rank_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FREEKV_FAULTS", "recall@victim/rank=1,conversion:2/rank=0")
    on0, on1 = FaultPlan.from_env(0), FaultPlan.from_env(1)
    assert (on0.prefix, on0.at) == ({}, {"conversion": 2})
    assert (on1.prefix, on1.at) == ({"recall": "victim"}, {})
    assert on1.hit("recall", ["victim-7"]) and not on0.hit("recall", ["victim-7"])
    # Unqualified entries apply to every rank.
    monkeypatch.setenv("FREEKV_FAULTS", "recall:1")
    assert FaultPlan.from_env(0).at == FaultPlan.from_env(3).at == {"recall": 1}


@pytest.mark.parametrize(
    "spec",
    [
        "conversion",
        "recall:0",
        "disk:1",
        "recall:x",
        "disk@r",
        "recall@",
        "recall:1/rank=x",
        "disk:1/rank=5",  # checked although rank 0 would not inject it
    ],
)
def test_fault_spec_is_checked(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("FREEKV_FAULTS", spec)
    with pytest.raises(ValueError, match="FREEKV_FAULTS"):
        FaultPlan.from_env()


def test_failed_dense_layer_offload_fails_its_request_without_a_recall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dense layer never recalls, so nothing waits for its offload jobs during decode; the
    next forward's K/V write of that layer still reports the failed job."""
    monkeypatch.setenv("FREEKV_FAULTS", "conversion:3")  # r3's layer-0 job
    cfg = FreeKVConfig(page_size=P, sink_tokens=4, window_tokens=8, budget_tokens=28)
    assert cfg.dense_layers == (0,)
    rt = small_runtime(cfg)
    g = torch.Generator().manual_seed(1)
    k_cache = [torch.randn(SLOTS, H, D, generator=g) for _ in range(LAYERS)]
    v_cache = [torch.randn(SLOTS, H, D, generator=g) for _ in range(LAYERS)]
    table = torch.arange(4 * 256, dtype=torch.int32).view(4, 256) % (SLOTS - 1) + 1
    for r, n in ((1, 20), (3, 24)):  # both within budget: no recall at all
        rt.begin_forward([r], [n], [f"r{r}"])
        for layer in range(LAYERS):
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], table)
    assert rt.failures() == {}
    for _ in range(50):  # the failed job finishes on a worker thread
        rt.begin_forward([1, 3], [21, 25], ["r1", "r3"], decode=True)
        rt.after_kv_write(0, k_cache[0], v_cache[0], table)
        if rt.failures():
            break
        time.sleep(0.02)
    assert set(rt.failures()) == {"r3"}
    assert "offload of layer 0 failed" in rt.failures()["r3"]
    rt.clear_failure("r3")
    _finish(rt, [1, 3])


def test_faults_by_rid_prefix_hit_each_matching_request_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FREEKV_FAULTS", "conversion@bad-,recall:2")
    plan = FaultPlan.from_env()
    assert plan.prefix == {"conversion": "bad-"} and plan.at == {"recall": 2}
    assert not plan.hit("conversion", ["ok-1"])
    assert plan.hit("conversion", ["ok-1", "bad-1"])
    assert not plan.hit("conversion", ["bad-1"])  # once per request
    assert plan.hit("conversion", ["bad-2"])
    assert not plan.hit("recall", ["bad-3"])  # recall counts, it is not matched by rid
    assert plan.hit("recall")
    assert not plan.hit("recall")


def test_a_broken_contract_propagates_and_fails_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure policy's other half: an error that is not FreeKV's own expected failure (a
    launcher's argument check, a CUDA error, a bug) is raised out of the decode step instead of
    being turned into per-request aborts of a server that then reports itself healthy."""
    from freekv_sglang.runtime import decode as decode_mod

    def broken(*_args: object) -> None:
        raise RuntimeError("k_buffers[0] must have shape [64, 2, 8], got [64, 2, 4]")

    monkeypatch.setattr(decode_mod, "recall_direct", broken)
    monkeypatch.delenv("FREEKV_FAULTS", raising=False)
    with pytest.raises(RuntimeError, match="must have shape"):
        _run([0, 1], [60, 70], 1)


def test_inconsistent_pools_raise_a_named_error() -> None:
    from freekv_sglang.runtime import InvariantError

    rt = small_runtime(CFG)
    assert rt.check_pools()
    rt.reclaim.tokens = -4
    with pytest.raises(InvariantError, match="reclaimed-slot count is negative"):
        rt.check_pools()
    rt.reclaim.tokens = 0
    leaked = rt.host.pool.alloc(1)  # held by nobody the runtime knows of
    with pytest.raises(InvariantError, match="idle, yet 1 host pages are in use"):
        rt.check_pools()
    rt.host.pool.release(leaked)
    assert rt.check_pools()
    rt.close()
