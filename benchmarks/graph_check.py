"""FreeKV's sparse decode step in a CUDA graph: capture once, replay each step after its host
part, outputs and state bit for bit equal to the eager step; graph vs eager time.

The question: does the device part of the step (every sparse layer's correction,
re-selection, recall, attention over the attended tables, speculation, counters) capture into
one ``torch.cuda.CUDAGraph`` and replay right when only the host part (``begin_forward``, the
offload of the pages that filled, the plan that writes the step buffers and tables) runs
between replays, and what does the graph save per step?

``--form graph`` (the default) runs the decode SGLang's graph runner drives,
:class:`~freekv_sglang.runtime.graph_decode.GraphDecode` (every layer's whole-context and
attended paged decodes in the kernel set's fixed form: FlashInfer's graph wrappers where
FlashInfer is installed, else the plain-torch reference); ``--form paged`` the eager path's
:class:`~freekv_sglang.runtime.FreeKVPagedDecode` with the reference attention.

A Llama-3.1-8B-shaped stack (32 layers, 32 query / 8 KV heads of 128, bf16; budget 2048 tokens
= 512 sink + 1024 selected + 512 window, pages of 32), every layer sparse, FreeKV's CUDA
kernels. Per step after the capture:
host part; snapshot of the runtime's device state; the eager step; its outputs and state;
the snapshot back; replay; outputs and state compared with ``torch.equal``. Then both are timed
over ``--reps`` runs (CUDA events, median).

``--dry-run`` (CPU, tiny sizes, the kernels compiled for the CPU): no graph exists on a CPU, so
the step is recorded (:mod:`freekv_sglang.testing.static_ops`) once as the "capture" and again
at each later step as the "replay"; the records must be equal (the same ops on the same buffers
with the same shapes), none may read a device value on the host, and the rerun's outputs and
state must equal the eager step's.

    python benchmarks/graph_check.py --out benchmarks/results/graph_check.json   # a GPU
    python benchmarks/graph_check.py --dry-run --out /tmp/graph_check.json

Exit status 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    sink_tokens: int
    window_tokens: int
    budget_tokens: int
    batch: int
    context: int


LLAMA_8B = Shape(32, 32, 8, 128, 32, 512, 512, 2048, batch=4, context=4096)
TINY = Shape(2, 4, 2, 64, 16, 16, 32, 96, batch=2, context=240)


class Stack:
    """A runtime with a simulated engine KV pool, prefilled, and its page-table decode."""

    def __init__(self, s: Shape, steps: int, device: torch.device, form: str) -> None:
        from freekv_sglang.config import FreeKVConfig
        from freekv_sglang.paged_attention import DecodeKernels, ReferenceDecodeKernels
        from freekv_sglang.runtime import FreeKVPagedDecode, FreeKVRuntime
        from freekv_sglang.runtime.graph_decode import GraphDecode

        self.s = s
        cfg = FreeKVConfig(
            page_size=s.page_size, sink_tokens=s.sink_tokens, window_tokens=s.window_tokens,
            budget_tokens=s.budget_tokens, tau=0.9, dense_layers=(),
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)  # small inputs, on the host
        g_dev = torch.Generator(device=device).manual_seed(0)  # the K/V pools, where they live
        max_seq = s.context + steps + 2 * s.page_size
        slots = s.batch * max_seq + 1
        bf16 = torch.bfloat16
        page_bytes = 2 * s.layers * s.kv_heads * s.head_dim * 2 * s.page_size
        # The engine's K/V pools: its token slots, then the budget regions' rows (one more
        # region in the graph form: its scratch, for inert rows).
        regions = s.batch + (form == "graph")
        shape = (slots + FreeKVRuntime.region_tokens(cfg, regions), s.kv_heads, s.head_dim)
        kw: dict[str, Any] = {"generator": g_dev, "device": device, "dtype": bf16}
        self.k = [torch.randn(shape, **kw) for _ in range(s.layers)]
        self.v = [torch.randn(shape, **kw) for _ in range(s.layers)]
        self.rt = FreeKVRuntime(
            cfg, num_layers=s.layers, num_q_heads=s.q_heads, num_kv_heads=s.kv_heads,
            head_dim=s.head_dim, max_requests=regions, max_seq_len=max_seq, dtype=bf16,
            device=device, host_pool_bytes=(s.batch * (max_seq // s.page_size + 2)) * page_bytes,
            conversion_threads=4, kv_buffers=(self.k, self.v), region_first_slot=slots,
        )  # fmt: skip
        r2t = torch.arange(s.batch * max_seq, dtype=torch.int32) + 1
        self.req_to_token = r2t.view(s.batch, max_seq).to(device)
        self.rows = list(range(s.batch))
        self.lens = [s.context - 3 * i for i in self.rows]
        self.rids = [f"r{i}" for i in self.rows]
        self.rt.begin_forward(self.rows, self.lens, self.rids)
        for layer in range(s.layers):
            self.rt.after_kv_write(layer, self.k[layer], self.v[layer], self.req_to_token)
        self.form = form
        self.attention = "reference"
        kernels: DecodeKernels = ReferenceDecodeKernels()
        if form == "graph" and device.type == "cuda" and importlib.util.find_spec("flashinfer"):
            from freekv_sglang.flashinfer_kernels import FlashInferDecodeKernels

            ws = torch.zeros(128 << 20, dtype=torch.uint8, device=device)
            kernels = FlashInferDecodeKernels(
                ws, use_tensor_cores=s.q_heads // s.kv_heads > 4, num_qo_heads=s.q_heads,
                num_kv_heads=s.kv_heads, head_dim=s.head_dim, q_dtype=bf16, kv_dtype=bf16,
            )  # fmt: skip
            self.attention = "flashinfer"
        self.paged = FreeKVPagedDecode(self.rt, kernels)
        self.graph = (
            GraphDecode(self.rt, kernels, s.batch, self.req_to_token) if form == "graph" else None
        )
        self.q = torch.zeros(s.batch, s.q_heads, s.head_dim, dtype=bf16, device=device)
        self.rows_t = torch.tensor(self.rows, device=device)
        self.lens_t = torch.zeros(s.batch, dtype=torch.int64, device=device)
        self.g = g
        self.device = device

    def host_part(self) -> None:
        """Before a step: the new token's K/V (as the engine writes it), the runtime's
        bookkeeping, the plan, and this step's query into its buffer."""
        s, rt, dev = self.s, self.rt, self.device
        self.lens = [n + 1 for n in self.lens]
        self.lens_t.copy_(torch.tensor(self.lens))
        rt.begin_forward(self.rows, self.lens, self.rids, decode=True)
        pos = torch.tensor(self.lens, device=dev) - 1
        slots = self.req_to_token[self.rows_t, pos].to(torch.int64)
        for layer in range(s.layers):
            new = torch.randn((2, s.batch, s.kv_heads, s.head_dim), generator=self.g)
            self.k[layer][slots] = new[0].to(dev, torch.bfloat16)
            self.v[layer][slots] = new[1].to(dev, torch.bfloat16)
            rt.after_kv_write(layer, self.k[layer], self.v[layer], self.req_to_token)
        scale = s.head_dim**-0.5
        if self.graph is not None:
            self.graph.plan(self.rows, self.lens, len(self.rows), self.req_to_token, scale)
        else:
            assert self.paged.plan(self.rows, self.lens, self.req_to_token, scale)
        moved = torch.randn(self.q.shape, generator=self.g).to(dev, torch.bfloat16)
        self.q.copy_(self.q * 0.7 + moved)

    def device_part(self) -> list[Tensor]:
        """The step of every layer (what a graph holds); the recall stream joins at the end."""
        r2t, scale = self.req_to_token, self.s.head_dim**-0.5
        if self.graph is not None:
            graph = self.graph
            outs = [
                graph.forward(layer, self.q, (self.k[layer], self.v[layer]), scale)
                for layer in range(self.s.layers)
            ]
        else:
            outs = [
                self.paged.forward(
                    layer, self.q, (self.k[layer], self.v[layer]), self.rows_t, self.lens_t, r2t
                )
                for layer in range(self.s.layers)
            ]
        self.rt.decode.order_after_recall()
        return outs

    def state(self) -> list[Tensor]:
        from freekv_sglang.runtime import stats as stats_mod

        return stats_mod.device_tensors(self.rt)

    def buffers(self) -> dict[str, Tensor]:
        """Everything that lives across steps, named (for the CPU record)."""
        named = {f"state.{i}": t for i, t in enumerate(self.state())}
        named.update({f"k.{i}": t for i, t in enumerate(self.k)})
        named.update({f"v.{i}": t for i, t in enumerate(self.v)})
        named.update(host_kv=self.rt.offload.host_kv, q=self.q, rows=self.rows_t,
                     lens=self.lens_t, req_to_token=self.req_to_token)  # fmt: skip
        if self.graph is not None:
            named.update({f"graph.{k}": t for k, t in self.graph.buffers().items()})
            return named
        named.update({f"index.{k}": t for k, t in self.paged._index.items()})
        named["attended.ok"] = self.paged._attended._ok  # type: ignore[attr-defined]
        named["attended.flat"] = self.paged._attended._flat  # type: ignore[attr-defined]
        return named

    def close(self) -> None:
        for r in self.rows:
            self.rt.release(r)
        self.rt.close()


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    """Bit for bit (uninitialised entries may hold NaN, which ``torch.equal`` calls unequal)."""

    def bits(t: Tensor) -> Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    return len(a) == len(b) and all(
        torch.equal(bits(x), bits(y)) for x, y in zip(a, b, strict=True)
    )


def _time_ms(fn: Any, reps: int, cuda: bool) -> float:
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run(s: Shape, steps: int, reps: int, dry: bool, form: str = "graph") -> dict[str, Any]:
    from freekv_sglang.ops import _load
    from freekv_sglang.testing.static_ops import recording

    device = torch.device("cpu" if dry else "cuda")
    t0 = time.perf_counter()
    st = Stack(s, steps + reps + 3, device, form)
    setup_s = time.perf_counter() - t0
    checks: list[dict[str, Any]] = []
    # Warm-up: one eager step (on the stream the capture will use, as torch advises).
    side = torch.cuda.Stream() if not dry else None
    st.host_part()
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            st.device_part()
        torch.cuda.current_stream().wait_stream(side)
    else:
        st.device_part()
    # Capture (the step's host part first: its buffers are what the graph reads).
    st.host_part()
    ext = _load.load_emulated_extension() if dry else None
    graph: Any = None
    captured: list[Any] = []
    if dry:
        snap = [t.clone() for t in st.state()]
        with recording(st.buffers(), ext) as rec:
            outs_g = st.device_part()
        captured = rec.log
        for t, saved in zip(st.state(), snap, strict=True):
            t.copy_(saved)
        checks.append({"step": "capture", "ops": len(captured), "host_reads": rec.forbidden})
    else:
        st.rt.offload.wait_all()  # no conversion worker calls CUDA while the capture runs
        torch.cuda.synchronize()
        st.rt.decode._spec_done = [None] * s.layers  # no wait on an event from before
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            outs_g = st.device_part()
        st.rt.decode._spec_done = [None] * s.layers
        torch.cuda.synchronize()
        checks.append({"step": "capture", "ops": None, "host_reads": []})
    ok = not checks[0]["host_reads"]
    for step in range(steps):
        if step:
            st.host_part()
        snap = [t.clone() for t in st.state()]
        outs_e = [o.clone() for o in st.device_part()]
        state_e = [t.clone() for t in st.state()]
        st.rt.decode.sync()
        for t, saved in zip(st.state(), snap, strict=True):
            t.copy_(saved)
        row: dict[str, Any] = {"step": step}
        if dry:
            with recording(st.buffers(), ext) as rec:
                outs_g = st.device_part()
            row["same_ops"] = rec.log == captured
            row["host_reads"] = rec.forbidden
        else:
            graph.replay()
            torch.cuda.synchronize()
            row["same_ops"] = True
            row["host_reads"] = []
        row["outputs_equal"] = _same(outs_g, outs_e)
        row["state_equal"] = _same(st.state(), state_e)
        row["recalled"] = st.rt.state.counters()["pages_recalled"]
        ok = ok and row["same_ops"] and not row["host_reads"]
        ok = ok and row["outputs_equal"] and row["state_equal"]
        checks.append(row)
        print(json.dumps(row), flush=True)
    cuda = not dry
    eager_ms = _time_ms(st.device_part, reps, cuda)
    replay_ms = _time_ms(graph.replay, reps, cuda) if graph is not None else None
    st.close()
    return {
        "ok": ok,
        "form": form,
        "attention": st.attention,
        "shape": asdict(s),
        "setup_s": setup_s,
        "checks": checks,
        "eager_ms_per_step": eager_ms,
        "graph_ms_per_step": replay_ms,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--form", choices=("graph", "paged"), default="graph")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "graph_check.json")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("graph_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    saved = os.environ.get("FREEKV_OPS")
    if args.dry_run:
        os.environ["FREEKV_OPS"] = "emulated"
    try:
        shape = TINY if args.dry_run else LLAMA_8B
        reps = 2 if args.dry_run else args.reps
        result = run(shape, args.steps, reps, args.dry_run, args.form)
    finally:
        if saved is None:
            os.environ.pop("FREEKV_OPS", None)
        else:
            os.environ["FREEKV_OPS"] = saved
    result["dry_run"] = args.dry_run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    g = result["graph_ms_per_step"]
    print(
        f"graph_check: {'ok' if result['ok'] else 'FAILED'}; eager "
        f"{result['eager_ms_per_step']:.3f} ms/step"
        + (f", graph {g:.3f} ms/step" if g is not None else " (no graph on a CPU)")
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
