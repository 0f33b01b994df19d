"""Kernel launches per sparse layer and decode step, host syncs, and the host bookkeeping's time.

The question: how many launches does FreeKV's decode step issue per sparse layer (each costs a
few microseconds on a GPU unless a CUDA graph holds them), does its device part read a device
value on the host, and how long does the host bookkeeping around it take per step? Measured on
the CPU with ``torch.profiler``, at batch 1, 8 and 64, on the runtime's real step over a
:class:`~freekv_sglang.runtime.FreeKVRuntime` with a real host pool, in both decode forms:
``paged``, the eager page-table decode (:class:`~freekv_sglang.runtime.FreeKVPagedDecode`:
every request sparse, so no whole-context decode), and ``graph``, the fixed form SGLang's
graph runner captures (:class:`~freekv_sglang.runtime.graph_decode.GraphDecode`: its sparse
layers also run the whole-context decode of every row and pick each row's output).

How a launch is counted, per step of the device part (the ``forward`` of every sparse
layer), divided by the sparse layers:

- FreeKV's ops run the kernels compiled for the CPU (``FREEKV_OPS=emulated``); each call is
  profiled as one region and counts the kernels its launcher starts on a GPU
  (``select_pages`` 2: scores, then top-k and delta, with the speculation's commit in the
  speculative one; ``correction_masks``, ``recall_direct``, ``page_digest`` 1 each);
- the attention kernels are the plain-torch references inside regions that count what
  FlashInfer launches for them (a paged decode 1, with split-KV off);
- every other ``aten::`` op counts 1 if it launches on a GPU (views, allocations and metadata
  do not) and no op under it does (``aten::zeros`` counts its ``fill_`` once).

Host syncs: leaf ops that read a device value on the host (``_local_scalar_dense``,
``nonzero``, ``masked_select``, ``unique``, ``is_nonzero``, ``equal``) in the device part.
Host time: ``begin_forward`` + the decode's ``plan`` (regions, step buffers, tables, offload
waits), per step, median over the measured steps; the per-layer offload (``after_kv_write``)
is reported apart.

    python benchmarks/bench_launches.py                      # batches 1, 8, 64; both forms
    python benchmarks/bench_launches.py --batches 1,8 --steps 3 --forms graph --out /tmp/l.json

Writes ``benchmarks/results/launches.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function

RESULTS = Path(__file__).resolve().parent / "results"
# Kernels each FreeKV launcher starts on a GPU.
KERNELS = {
    "select_pages": 2, "correction_flags": 1, "correction_masks": 1, "recall_direct": 1,
    "page_digest": 1,
}  # fmt: skip
# Attention kernels FlashInfer launches per call (batch decode without split-KV).
ATTENTION = {"paged_decode": 1, "merge": 1}
# Leaf ops that launch nothing on a GPU.
NO_LAUNCH = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::_unsafe_view",
    "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
    "aten::expand", "aten::permute", "aten::transpose", "aten::t", "aten::alias",
    "aten::detach", "aten::unbind", "aten::split", "aten::narrow", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_reshape_alias", "aten::result_type",
    "aten::split_with_sizes", "aten::chunk", "aten::reshape", "aten::contiguous",
    "aten::expand_as", "aten::view_as", "aten::squeeze_", "aten::unsqueeze_", "aten::to",
    "aten::detach_", "aten::set_", "aten::is_nonzero_never",
}  # fmt: skip
SYNCS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::is_nonzero", "aten::equal",
}  # fmt: skip


@dataclass(frozen=True)
class Geometry:
    """A model shape small enough for a 2-core CPU; the launch count does not depend on it."""

    layers: int = 2
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    page_size: int = 16
    sink_tokens: int = 16
    window_tokens: int = 32
    budget_tokens: int = 112  # 4 selected pages
    context: int = 300


@contextmanager
def _marked_ops() -> Iterator[None]:
    """Profile each call of FreeKV's compiled ops as one region named for the op."""
    from freekv_sglang.ops import _load

    ext = _load.load_emulated_extension()
    saved = {name: getattr(ext, name) for name in KERNELS}

    def marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            with record_function(f"freekv_ops.{name}"):
                return fn(*args)

        return call

    for name, fn in saved.items():
        setattr(ext, name, marked(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ext, name, fn)


class _MarkedPaged:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def plan(self, table: Any, sm_scale: float, logit_cap: float) -> None:
        self._inner.plan(table, sm_scale, logit_cap)

    def run(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        with record_function("attention.paged_decode"):
            out: Tensor = self._inner.run(q, kv)
            return out

    def run_with_lse(self, q: Tensor, kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with record_function("attention.paged_decode"):
            o, lse = self._inner.run_with_lse(q, kv)
            return o, lse

    def buffers(self) -> list[Tensor]:
        return list(self._inner.buffers())


class MarkedKernels:
    """The reference attention kernels, each call profiled as one region."""

    def __init__(self) -> None:
        from freekv_sglang.paged_attention import ReferenceDecodeKernels

        self._ref = ReferenceDecodeKernels()

    def paged(self, fixed: Any = None) -> _MarkedPaged:
        return _MarkedPaged(self._ref.paged(fixed))

    def merge(self, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
        with record_function("attention.merge"):
            out: Tensor = self._ref.merge(o_a, lse_a, o_b, lse_b)
            return out

    def single(self, q: Tensor, k: Tensor, v: Tensor, sm_scale: float, logit_cap: float) -> Tensor:
        with record_function("attention.paged_decode"):
            return self._ref.single(q, k, v, sm_scale, logit_cap)


def count_launches(events: list[Any]) -> tuple[Counter[str], int]:
    """Launches by kind in a profile, and the host syncs: see the module doc."""
    launches: Counter[str] = Counter()
    syncs = 0

    def inside_region(e: Any) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith(("freekv_ops.", "attention.")):
                return True
            p = p.cpu_parent
        return False

    def launches_below(e: Any) -> bool:
        return any(
            c.name.startswith("aten::") and (c.name not in NO_LAUNCH or launches_below(c))
            for c in e.cpu_children
        )

    for e in events:
        name = e.name
        if name.startswith("freekv_ops."):
            launches[name] += KERNELS[name.removeprefix("freekv_ops.")]
            continue
        if name.startswith("attention."):
            launches[name] += ATTENTION[name.removeprefix("attention.")]
            continue
        if not name.startswith("aten::") or inside_region(e):
            continue
        if name in SYNCS:
            syncs += 1
        # The lowest op that launches: its own work is a kernel, its children only allocate.
        if name not in NO_LAUNCH and not launches_below(e):
            launches[name] += 1
    return launches, syncs


def run_batch(
    geo: Geometry, batch: int, steps: int, selection: str, form: str = "paged"
) -> dict[str, Any]:
    from freekv_sglang.config import FreeKVConfig
    from freekv_sglang.runtime import FreeKVPagedDecode, FreeKVRuntime
    from freekv_sglang.runtime.graph_decode import GraphDecode

    g = torch.Generator().manual_seed(batch)
    cfg = FreeKVConfig(
        page_size=geo.page_size,
        sink_tokens=geo.sink_tokens,
        window_tokens=geo.window_tokens,
        budget_tokens=geo.budget_tokens,
        tau=0.8,
        dense_layers=(),
        selection=selection,  # type: ignore[arg-type]
    )
    max_seq = geo.context + steps + 64
    slots = batch * max_seq + 1
    bf16 = torch.bfloat16
    h, d = geo.kv_heads, geo.head_dim
    page_bytes = 2 * geo.layers * h * d * 2 * geo.page_size
    # The engine's K/V pools: its token slots, then the budget regions' rows (and the graph
    # form's scratch region).
    regions = batch + (form == "graph")
    rows = slots + FreeKVRuntime.region_tokens(cfg, regions)
    k_cache = [torch.randn(rows, h, d, generator=g).to(bf16) for _ in range(geo.layers)]
    v_cache = [torch.randn(rows, h, d, generator=g).to(bf16) for _ in range(geo.layers)]
    rt = FreeKVRuntime(
        cfg, num_layers=geo.layers, num_q_heads=geo.q_heads, num_kv_heads=h, head_dim=d,
        max_requests=regions, max_seq_len=max_seq, dtype=bf16, device=torch.device("cpu"),
        host_pool_bytes=(batch * (max_seq // geo.page_size + 2) + 8) * page_bytes,
        conversion_threads=2, kv_buffers=(k_cache, v_cache), region_first_slot=slots,
    )  # fmt: skip
    req_to_token = (torch.arange(batch * max_seq, dtype=torch.int32) + 1).view(batch, max_seq)
    rows = list(range(batch))
    lens = [geo.context + (i % 7) for i in rows]
    rids = [f"r{i}" for i in rows]
    rt.begin_forward(rows, lens, rids)
    for layer in range(geo.layers):
        rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)
    paged = FreeKVPagedDecode(rt, MarkedKernels())  # type: ignore[arg-type]
    graph = GraphDecode(rt, MarkedKernels(), batch, req_to_token) if form == "graph" else None  # type: ignore[arg-type]
    q = torch.randn(batch, geo.q_heads, d, generator=g).to(bf16)
    rows_t, lens_t = torch.tensor(rows), torch.zeros(batch, dtype=torch.int64)
    host_s, offload_s, per_step = [], [], []
    syncs_total = 0
    for step in range(steps + 1):  # the first step warms up and is not reported
        lens = [n + 1 for n in lens]
        lens_t.copy_(torch.tensor(lens))
        t0 = time.perf_counter()
        rt.begin_forward(rows, lens, rids, decode=True)
        if graph is not None:
            graph.plan(rows, lens, batch, req_to_token, d**-0.5)
        else:
            assert paged.plan(rows, lens, req_to_token, d**-0.5)
        t1 = time.perf_counter()
        for layer in range(geo.layers):
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)
        t2 = time.perf_counter()
        q = (q.float() + 0.5 * torch.randn(q.shape, generator=g)).to(bf16)
        with _marked_ops(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for layer in range(geo.layers):
                kv = (k_cache[layer], v_cache[layer])
                if graph is not None:
                    graph.forward(layer, q, kv, d**-0.5)
                else:
                    paged.forward(layer, q, kv, rows_t, lens_t, req_to_token)
        if step == 0:
            continue
        launches, syncs = count_launches(list(prof.events()))
        syncs_total += syncs
        per_step.append(launches)
        host_s.append(t1 - t0)
        offload_s.append(t2 - t1)
    for r in rows:
        rt.release(r)
    rt.close()
    first = per_step[0]
    if any(c != first for c in per_step[1:]):
        raise RuntimeError("the launch count changed from step to step")
    total = sum(first.values())
    return {
        "batch": batch,
        "form": form,
        "selection": selection,
        "launches_per_sparse_layer": total / geo.layers,
        "by_op_per_sparse_layer": {k: v / geo.layers for k, v in sorted(first.items())},
        "host_syncs_per_step": syncs_total / steps,
        "host_bookkeeping_ms_per_step": 1e3 * statistics.median(host_s),
        "offload_ms_per_step": 1e3 * statistics.median(offload_s),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--selection", default="speculative", choices=["speculative", "current"])
    ap.add_argument("--forms", default="paged,graph", help="decode forms: paged, graph")
    ap.add_argument("--out", type=Path, default=RESULTS / "launches.json")
    args = ap.parse_args(argv)
    saved = os.environ.get("FREEKV_OPS")
    os.environ["FREEKV_OPS"] = "emulated"
    try:
        geo = Geometry()
        batches = [int(b) for b in args.batches.split(",")]
        forms = args.forms.split(",")
        if not set(forms) <= {"paged", "graph"}:
            ap.error(f"--forms: paged and/or graph, not {args.forms}")
        rows = [run_batch(geo, b, args.steps, args.selection, f) for f in forms for b in batches]
    finally:
        if saved is None:
            os.environ.pop("FREEKV_OPS", None)
        else:
            os.environ["FREEKV_OPS"] = saved
    for r in rows:
        print(
            f"{r['form']:5s} batch {r['batch']:3d}: {r['launches_per_sparse_layer']:.0f} launches "
            f"per sparse "
            f"layer and step, {r['host_syncs_per_step']:.0f} host syncs per step, host "
            f"bookkeeping {r['host_bookkeeping_ms_per_step']:.2f} ms/step (offload "
            f"{r['offload_ms_per_step']:.2f} ms)"
        )
    result = {"meta": {"geometry": asdict(geo), "torch": torch.__version__}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
