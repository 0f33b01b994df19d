"""Decode-step time of a Llama-3.1-8B-shaped stack on one GPU: dense, FreeKV and two baselines.

Runs on a bare GPU host with only Python >= 3.10, a CUDA build of torch (>= 2.11) and nvcc: no
SGLang, no Rust extension, no network. Like ``benchmarks/gpu_check.py`` it imports only
``freekv_sglang.ops`` (built on first use), and a pinned torch tensor of the host pool's layout
(``[pages, L, H, 2, p, D]``) stands in for the Rust host pool.

The model. 32 layers, 32 query / 8 KV heads, head_dim 128, hidden 4096, random bf16 weights;
per layer the QKV and output projections and the MLP's matmuls (gate+up 4096 x 28672, down
14336 x 4096: the same cost as Llama's MLP). Weights come in ``--weight-sets`` distinct sets
cycled over the layers (each set is far larger than L2, so every layer streams its weights from
HBM as a full model would). Contexts stay fixed during the measured steps; the new token's K/V
is written into the last window slot.

Queries. Selection needs realistic step-to-step query similarity, which random weights do not
give, so each layer's query is a synthetic stream ``q_t = rho q_{t-1} + sqrt(1 - rho^2) n_t``
(``--query-rho``; the projection is still computed for its cost). Page digests are min/max of
random keys, one per host pool page (the ops' per-host-page digest store); request ``i``'s
logical page ``j`` is host page ``(i * P + j) mod capacity``, so a request's pages have distinct
host pages (and digests) whenever the pool holds one context, which the default pool size
ensures. The page miss rate that results is measured and reported (pages recalled per step).

Variants, per (context, batch), all with the same compute:

- ``dense``: SDPA over the full KV cache on the GPU. Where the full cache of all layers does not
  fit, layers share KV tensors (each still far larger than L2, so the HBM traffic per layer is
  that of a real cache); the row says ``full_kv_allocated`` false. On an H200 torch's SDPA picks
  cuDNN's flash kernel for the ``[B, H_kv, G, D]`` query, whose G rows fill one tile of 64:
  about 340 GB/s of KV at batch 1 (12 of 16.7 ms at 32K), far from a decode kernel's bandwidth;
- ``dense_mm``: the same attention as two batched products that read K and V once (float32
  softmax between them). The ratios ``vs dense`` use the faster of the two;
- ``freekv``: per layer, wait for the speculative recall issued at the previous step, compute
  correction flags, re-select and recall synchronously the heads flagged (a fixed share
  ``--correction-rate`` of heads, drawn at random, stands in for the cosine rule), attend over
  sink + selected + window (budget 2048 = 512 + 1024 + 512, page 32), then on the recall stream
  select with this step's query and recall the delta for the next step (device-driven recall,
  `freekv_sglang.ops.recall_direct`);
- ``sync``: synchronous retrieval (ArkVale/Quest): select with the current query and recall
  before attention, on the compute stream;
- ``noovl``: FreeKV with the speculative selection and recall on the compute stream (no
  overlap); its speculative work is timed with CUDA events.

``--graph`` captures each variant's step (every layer) in one CUDA graph and times replays; in
a replay the speculative recall of a layer overlaps the later layers of the same step and joins
at its end.

Reported: median step time, the host's time to queue a step (``host_issue_ms``: at the step
time, the step is bound by Python and launches), tokens/s (batch / step time), pages recalled
in the last step, and the share of the speculative work hidden behind compute:
``hidden = (t_noovl - t_freekv) / t_spec_work`` (clamped to [0, 1]).

    python benchmarks/bench_decode_gpu.py                 # on a GPU host, < 8 minutes on H200
    python benchmarks/bench_decode_gpu.py --dry-run       # anywhere: CPU, tiny sizes

``--dry-run`` runs the same loop on CPU with tiny sizes, the ops' pure-torch references standing
in for the kernels (streams and events become no-ops); CI runs it to keep the script working.
Writes ``benchmarks/results/decode_gpu.json`` (``--out``; the dry run writes under
``benchmarks/results/tmp/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
import traceback
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_ops() -> types.ModuleType:
    """Import ``freekv_sglang.ops`` without the package's Rust extension when it is absent."""
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import freekv_sglang  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("freekv_sglang")
        pkg.__path__ = [str(ROOT / "python" / "freekv_sglang")]
        sys.modules["freekv_sglang"] = pkg
    import freekv_sglang.ops as ops

    return ops


ops = _import_ops()

VARIANTS = ("dense", "dense_mm", "freekv", "sync", "noovl")


@dataclass(frozen=True)
class Shape:
    """Model and FreeKV geometry."""

    layers: int = 32
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    ffn: int = 14336
    page: int = 32
    sink: int = 512
    window: int = 512
    budget: int = 2048

    @property
    def selected_pages(self) -> int:
        return (self.budget - self.sink - self.window) // self.page


FULL = Shape()
TINY = Shape(layers=3, q_heads=4, kv_heads=2, head_dim=16, hidden=64, ffn=96, page=4, sink=8,
             window=8, budget=32)  # fmt: skip


class Dev:
    """Device, streams, events and timers (CUDA), or their no-op CPU stand-ins (dry run)."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.recall_stream = None if dry else torch.cuda.Stream()

    @contextlib.contextmanager
    def on_recall_stream(self) -> Iterator[None]:
        if self.recall_stream is None:
            yield
            return
        self.recall_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.recall_stream):
            yield

    def event(self, timing: bool = False) -> Any:
        if self.dry:
            return time.perf_counter() if timing else None
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record()
        return ev

    def wait(self, ev: Any) -> None:
        if ev is not None and not self.dry:
            torch.cuda.current_stream().wait_event(ev)

    def elapsed_s(self, a: Any, b: Any) -> float:
        if self.dry:
            return float(b - a)
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()


class Weights:
    """``n`` sets of layer weights (bf16), cycled over the layers."""

    def __init__(self, s: Shape, n: int, dev: torch.device, dt: torch.dtype) -> None:
        def w(i: int, o: int) -> torch.Tensor:
            return torch.empty(i, o, dtype=dt, device=dev).normal_(0, i**-0.5)

        qkv = (s.q_heads + 2 * s.kv_heads) * s.head_dim
        self.sets = [
            (w(s.hidden, qkv), w(s.q_heads * s.head_dim, s.hidden), w(s.hidden, 2 * s.ffn),
             w(s.ffn, s.hidden))
            for _ in range(n)
        ]  # fmt: skip

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.sets[i % len(self.sets)]


def _gib(nbytes: float) -> float:
    return nbytes / 2**30


class Cell:
    """State of one (context, batch) point; built per variant and dropped after it."""

    def __init__(self, s: Shape, ctx: int, b: int, dev: Dev, a: argparse.Namespace) -> None:
        self.s, self.ctx, self.b, self.dev = s, ctx, b, dev
        d = dev.device
        self.dt = torch.bfloat16
        g = torch.Generator(device="cpu").manual_seed(ctx * 131 + b)
        torch.manual_seed(ctx * 131 + b)  # device draws (KV, digests): same data per variant
        self.rho = a.query_rho
        self.x = torch.randn(b, s.hidden, generator=g).to(d, self.dt)
        # Per-layer query streams and a bank of noise to advance them.
        self.q = torch.randn(s.layers, b, s.q_heads, s.head_dim, generator=g).to(d)
        self.noise = torch.randn(4, s.layers, b, s.q_heads, s.head_dim, generator=g).to(d)
        self.q16 = self.q.to(self.dt)
        self.masks = (torch.rand(8, s.layers, b, s.kv_heads, generator=g) < a.correction_rate).to(d)
        # The step counter, on the device (advanced at the end of every step, replays too).
        self.t_dev = torch.zeros(1, dtype=torch.int64, device=d)
        self.spec_ev: list[Any] = [None] * s.layers  # speculative recall done, per layer

    def advance_query(self, layer: int) -> torch.Tensor:
        """The layer's query of this step: its noise draw is picked by the step counter on the
        device, so a captured step replays the same query process as eager steps."""
        q = self.q[layer]
        noise = self.noise.index_select(0, self.t_dev % self.noise.shape[0])[0, layer]
        q.mul_(self.rho).add_(noise, alpha=math.sqrt(1 - self.rho**2))
        self.q16[layer].copy_(q)
        return self.q16[layer]

    # --- dense --------------------------------------------------------------------------------

    def build_dense(self, cap_gib: float) -> dict[str, Any]:
        s, d = self.s, self.dev.device
        per_layer = 2 * self.b * s.kv_heads * self.ctx * s.head_dim * 2
        n = max(1, min(s.layers, int(cap_gib * 2**30 // per_layer)))
        self.kv = [
            tuple(torch.empty(self.b, s.kv_heads, self.ctx, s.head_dim, dtype=self.dt,
                              device=d).normal_() for _ in range(2))
            for _ in range(n)
        ]  # fmt: skip
        return {"kv_sets": n, "full_kv_GiB": _gib(per_layer * s.layers),
                "full_kv_allocated": n == s.layers}  # fmt: skip

    def dense_attention(
        self, layer: int, q: torch.Tensor, kv: tuple[torch.Tensor, ...], mm: bool = False
    ):
        k, v = self.kv[layer % len(self.kv)]
        k[:, :, -1].copy_(kv[0])
        v[:, :, -1].copy_(kv[1])
        g = self.s.q_heads // self.s.kv_heads
        qh = q.view(self.b, self.s.kv_heads, g, self.s.head_dim)
        if not mm:
            return torch.nn.functional.scaled_dot_product_attention(qh, k, v)
        # The memory-bound form of a decode: two batched products that read K and V once, the
        # softmax in float32 between them.
        p = torch.softmax((qh @ k.transpose(-1, -2)).float() * self.s.head_dim**-0.5, dim=-1)
        return p.to(v.dtype) @ v

    # --- FreeKV state -------------------------------------------------------------------------

    def build_sparse(self, host_kv: torch.Tensor) -> dict[str, Any]:
        s, b, d, dt = self.s, self.b, self.dev.device, self.dt
        n_p, k = self.ctx // s.page, s.selected_pages
        self.n_p, self.host_kv = n_p, host_kv
        cap = host_kv.shape[0]
        # [L, N, 2, H, D] per host pool page: lo, and hi = lo + a positive spread, per layer.
        self.digests = torch.empty(s.layers, cap, 2, s.kv_heads, s.head_dim, dtype=dt, device=d)
        for layer in range(s.layers):
            lo = torch.empty(cap, s.kv_heads, s.head_dim, device=d).normal_()
            self.digests[layer, :, 0] = lo
            self.digests[layer, :, 1] = lo + torch.empty_like(lo).exponential_()
            del lo
        self.rows = torch.arange(b, device=d)
        self.seq = torch.full((b,), self.ctx, dtype=torch.int64, device=d)
        self.seq_next = self.seq + 1
        self.s2p = torch.full((s.layers, b, s.kv_heads, k), -1, dtype=torch.int64, device=d)
        self.p2s = torch.full((s.layers, b, s.kv_heads, n_p), -1, dtype=torch.int64, device=d)
        self.host_pages = (torch.arange(b * n_p, device=d) % cap).view(b, n_p)
        # Budget region of request i: [sink | k selected pages | window] token slots.
        self.slot_tokens = (torch.arange(b, device=d) * s.budget + s.sink).view(b, 1) + (
            torch.arange(k, device=d) * s.page
        )
        self.kb = [torch.empty(b * s.budget, s.kv_heads, s.head_dim, dtype=dt, device=d).normal_()
                   for _ in range(s.layers)]  # fmt: skip
        self.vb = [torch.empty_like(x).normal_() for x in self.kb]
        self.q_prev = torch.zeros(s.layers, b, s.q_heads, s.head_dim, dtype=dt, device=d)
        self.cos = torch.empty(b, s.kv_heads, device=d)
        self.flags = torch.empty(b, s.kv_heads, dtype=torch.bool, device=d)
        self.spec_out = [ops.SelectOutputs.allocate(b, s.q_heads, s.kv_heads, n_p, k, k, d)
                         for _ in range(s.layers)]  # fmt: skip
        self.now_out = [ops.SelectOutputs.allocate(b, s.q_heads, s.kv_heads, n_p, k, k, d)
                        for _ in range(s.layers)]  # fmt: skip
        return {"digests_GiB": _gib(self.digests.numel() * 2),
                "budget_buffers_GiB": _gib(2 * s.layers * self.kb[0].numel() * 2),
                "host_pages_shared_in_request": n_p > cap}  # fmt: skip

    def select(self, layer: int, q: torch.Tensor, seq: torch.Tensor, out: Any, mask=None) -> Any:
        s = self.s
        return ops.select_pages(
            q, self.digests[layer], self.rows, seq, self.s2p[layer], self.p2s[layer],
            self.host_pages, self.slot_tokens, page_size=s.page,
            num_sink_pages=s.sink // s.page, num_window_pages=s.window // s.page,
            top_k=s.selected_pages, layer=layer, head_mask=mask, out=out,
        )  # fmt: skip

    def recall(self, out: Any) -> None:
        ops.recall_direct(self.host_kv, out.work, self.kb, self.vb)

    def sparse_attention(self, layer: int, q: torch.Tensor, kv: tuple[torch.Tensor, ...]):
        s, b = self.s, self.b
        kb = self.kb[layer].view(b, s.budget, s.kv_heads, s.head_dim)
        vb = self.vb[layer].view(b, s.budget, s.kv_heads, s.head_dim)
        kb[:, -1].copy_(kv[0])
        vb[:, -1].copy_(kv[1])
        g = s.q_heads // s.kv_heads
        qh = q.view(b, s.kv_heads, g, s.head_dim)
        return torch.nn.functional.scaled_dot_product_attention(
            qh, kb.transpose(1, 2), vb.transpose(1, 2)
        )


def layer_qkv(cell: Cell, w: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The QKV projection; returns the new token's ``(k, v)``, each ``[B, H, D]``."""
    s, b = cell.s, cell.b
    qkv = cell.x @ w[0]
    q_end, kd = s.q_heads * s.head_dim, s.kv_heads * s.head_dim
    k = qkv[:, q_end : q_end + kd].view(b, s.kv_heads, s.head_dim)
    v = qkv[:, q_end + kd :].view(b, s.kv_heads, s.head_dim)
    return k, v


def layer_finish(cell: Cell, w: tuple[torch.Tensor, ...], attn: torch.Tensor) -> None:
    """Output projection and MLP (gate/up, SiLU-and-multiply, down)."""
    s = cell.s
    o = attn.reshape(cell.b, s.q_heads * s.head_dim) @ w[1]
    h = (cell.x + o) @ w[2]
    a = torch.nn.functional.silu(h[:, : s.ffn]) * h[:, s.ffn :]
    _ = a @ w[3]


def step(
    cell: Cell,
    weights: Weights,
    variant: str,
    a: argparse.Namespace,
    timers: list[tuple[Any, Any]],
) -> None:
    """One decode step of every layer. ``noovl`` appends the (start, end) events of its
    speculative work to ``timers``."""
    s, dev = cell.s, cell.dev
    for layer in range(s.layers):
        w = weights.layer(layer)
        if variant in ("freekv", "noovl"):
            dev.wait(cell.spec_ev[layer])  # before anything touches this layer's FreeKV state
        q = cell.advance_query(layer)
        kv = layer_qkv(cell, w)
        if variant in ("dense", "dense_mm"):
            attn = cell.dense_attention(layer, q, kv, mm=variant == "dense_mm")
        else:
            if variant == "sync":
                cell.recall(cell.select(layer, q, cell.seq, cell.now_out[layer]))
            else:
                ops.correction_flags(q, cell.q_prev[layer], s.kv_heads, a.tau, cell.cos,
                                     cell.flags)  # fmt: skip
                mask = cell.masks.index_select(0, cell.t_dev % cell.masks.shape[0])[0, layer]
                cell.recall(cell.select(layer, q, cell.seq, cell.now_out[layer], mask))
            attn = cell.sparse_attention(layer, q, kv)
        if variant in ("freekv", "noovl"):
            cell.q_prev[layer].copy_(q)
            if variant == "freekv":
                with dev.on_recall_stream():
                    cell.recall(cell.select(layer, q, cell.seq_next, cell.spec_out[layer]))
                    cell.spec_ev[layer] = dev.event()
            else:
                t0 = dev.event(timing=True)
                cell.recall(cell.select(layer, q, cell.seq_next, cell.spec_out[layer]))
                timers.append((t0, dev.event(timing=True)))
        layer_finish(cell, w, attn)
    cell.t_dev.add_(1)


def _measured(cell: Cell, variant: str, step_s: float, issue_s: float) -> dict[str, Any]:
    """A cell's row from its step time and the host's time to queue a step (``host_issue_ms``:
    at or above ``step_ms`` the step is bound by the host, Python and launches), with the
    pages the last step recalled and the pages selected per step."""
    res: dict[str, Any] = {"step_ms": 1e3 * step_s, "tokens_per_s": cell.b / step_s,
                           "host_issue_ms": 1e3 * issue_s}  # fmt: skip
    if not variant.startswith("dense"):
        outs = cell.now_out if variant == "sync" else cell.spec_out + cell.now_out
        res["pages_recalled_last_step"] = int(sum(int(o.counts[..., 1].sum()) for o in outs))
        res["pages_selected_per_step"] = (
            cell.b * cell.s.layers * cell.s.kv_heads * (cell.s.selected_pages)
        )
    return res


def run_variant(
    cell: Cell, weights: Weights, variant: str, a: argparse.Namespace, steps: int, warmup: int
) -> dict[str, Any]:
    """Warm up, then time ``steps`` consecutive steps (no synchronisation between them, so the
    speculative recall of one step overlaps the next as in serving); the end event waits for
    every pending speculative recall."""
    dev = cell.dev
    timers: list[tuple[Any, Any]] = []
    for _ in range(warmup):
        step(cell, weights, variant, a, [])
    dev.sync()
    t0 = dev.event(timing=True)
    h0 = time.perf_counter()
    for _ in range(steps):
        step(cell, weights, variant, a, timers)
    issue_s = time.perf_counter() - h0
    for ev in cell.spec_ev:
        dev.wait(ev)
    t1 = dev.event(timing=True)
    total = dev.elapsed_s(t0, t1)
    dev.sync()
    res = _measured(cell, variant, total / steps, issue_s / steps)
    if a.profile:
        res["device_time_by_op"] = profile_steps(cell, weights, variant, a)
    if variant == "noovl":
        res["spec_work_ms"] = 1e3 * sum(dev.elapsed_s(x, y) for x, y in timers) / steps
    return res


def run_variant_graph(
    cell: Cell, weights: Weights, variant: str, a: argparse.Namespace, steps: int, warmup: int
) -> dict[str, Any]:
    """The step captured once in a CUDA graph (after eager warm-up steps), then ``steps``
    replays back to back. A replay holds every layer: the speculative recall of layer l runs
    on the recall stream beside layers l+1.. of the same replay and joins at its end (a graph
    cannot wait for an event of the previous replay), so only the last layers' speculative
    work is exposed, where the eager step hides it behind the next step's first layers."""
    if variant == "noovl":
        raise ValueError("noovl times its speculative work with events: not in a graph")
    dev = cell.dev
    for _ in range(warmup):
        step(cell, weights, variant, a, [])
    for ev in cell.spec_ev:
        dev.wait(ev)
    dev.sync()
    cell.spec_ev = [None] * cell.s.layers
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=side):
        step(cell, weights, variant, a, [])
        for ev in cell.spec_ev:
            dev.wait(ev)  # join the recall stream: a capture ends on its own stream
    cell.spec_ev = [None] * cell.s.layers
    graph.replay()  # one untimed replay
    dev.sync()
    t0 = dev.event(timing=True)
    h0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    issue_s = time.perf_counter() - h0
    t1 = dev.event(timing=True)
    per = dev.elapsed_s(t0, t1) / steps
    dev.sync()
    del graph
    return {"graph": True, **_measured(cell, variant, per, issue_s / steps)}


def profile_steps(
    cell: Cell, weights: Weights, variant: str, a: argparse.Namespace, top: int = 12
) -> list[dict[str, Any]]:
    """Two more steps under the torch profiler: the ``top`` ops by device time, per step
    (``device_us`` summed over the layers, ``calls`` per step), and their launch count."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([] if cell.dev.dry else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step(cell, weights, variant, a, [])
        cell.dev.sync()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", 0.0) or 0.0
        if dev_us > 0 and ev.device_type.name in ("CUDA", "PrivateUse1"):
            rows.append({"op": ev.key[:80], "calls": ev.count / 2, "device_us": dev_us / 2})
    rows.sort(key=lambda r: -r["device_us"])
    total = sum(r["device_us"] for r in rows)
    kernels = sum(r["calls"] for r in rows)
    print(f"  {variant} B={cell.b}: {total / 1e3:.2f} ms device time, {kernels:.0f} kernels/step")
    for r in rows[:top]:
        print(f"    {r['device_us'] / 1e3:8.3f} ms {r['calls']:6.0f}x  {r['op']}")
    return [{"total_device_us": total, "kernels": kernels}, *rows[:top]]


def bench(a: argparse.Namespace, dev: Dev, s: Shape, res: dict[str, Any]) -> None:
    t_start = time.perf_counter()
    contexts = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    variants = [v for v in a.variants.split(",") if v]
    weights = Weights(s, a.weight_sets, dev.device, torch.bfloat16)
    page_bytes = s.layers * s.kv_heads * 2 * s.page * s.head_dim * 2
    cap = max(1, int(a.host_pool_gib * 2**30 // page_bytes))
    t0 = time.perf_counter()
    host_kv = torch.empty(cap, s.layers, s.kv_heads, 2, s.page, s.head_dim, dtype=torch.bfloat16,
                          pin_memory=not dev.dry)  # fmt: skip
    host_kv.view(torch.int16).fill_(0x3F80)  # bf16 1.0: touch every page
    res["host_pool"] = {"pages": cap, "GiB": _gib(cap * page_bytes),
                        "alloc_s": time.perf_counter() - t0}  # fmt: skip
    rows: list[dict[str, Any]] = []
    res["rows"] = rows
    for ctx in contexts:
        for b in batches:
            for variant in variants:
                row: dict[str, Any] = {"context": ctx, "batch": b, "variant": variant}
                rows.append(row)
                if time.perf_counter() - t_start > a.time_limit_s:
                    row["skipped"] = "time limit"
                    continue
                cell = None
                try:
                    cell = Cell(s, ctx, b, dev, a)
                    if variant.startswith("dense"):
                        row.update(cell.build_dense(a.dense_cap_gib))
                    else:
                        row.update(cell.build_sparse(host_kv))
                    run = run_variant_graph if a.graph else run_variant
                    row.update(run(cell, weights, variant, a, a.steps, a.warmup))
                except torch.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {str(e)[:200]}"
                except Exception as e:  # keep what was measured, go on
                    row["error"] = f"{type(e).__name__}: {e}"[:2000]
                    traceback.print_exc()
                finally:
                    del cell
                    if not dev.dry:
                        torch.cuda.empty_cache()
                msg = row.get("error") or f"{row.get('step_ms', float('nan')):.2f} ms"
                print(f"[{time.perf_counter() - t_start:6.1f}s] ctx={ctx} B={b} {variant}: {msg}",
                      flush=True)  # fmt: skip
    derive(rows)


def derive(rows: list[dict[str, Any]]) -> None:
    """Ratios to the baselines and the hidden share of speculative work, on the freekv rows.
    The dense baseline is the faster of the two dense attentions measured (``dense_baseline``
    names it)."""
    by = {(r["context"], r["batch"], r["variant"]): r for r in rows if "step_ms" in r}
    for (ctx, b, v), r in by.items():
        if v != "freekv":
            continue
        dense = [x for x in (by.get((ctx, b, d)) for d in ("dense", "dense_mm")) if x]
        if dense:
            best = min(dense, key=lambda x: x["step_ms"])
            r["speedup_vs_dense"] = best["step_ms"] / r["step_ms"]
            r["dense_baseline"] = best["variant"]
        for base in ("sync", "noovl"):
            x = by.get((ctx, b, base))
            if x:
                r[f"speedup_vs_{base}"] = x["step_ms"] / r["step_ms"]
        n = by.get((ctx, b, "noovl"))
        if n and n.get("spec_work_ms", 0) > 0:
            hidden = (n["step_ms"] - r["step_ms"]) / n["spec_work_ms"]
            r["recall_hidden_share"] = min(1.0, max(0.0, hidden))


def table(res: dict[str, Any]) -> str:
    head = (f"{'ctx':>7} {'B':>3} {'variant':<8} {'step ms':>8} {'tok/s':>8} {'pages/step':>10} "
            f"{'vs dense':>8} {'vs sync':>8} {'hidden':>7} {'host ms':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in res.get("rows", []):
        pre = f"{r['context']:>7} {r['batch']:>3} {r['variant']:<8}"
        if "step_ms" not in r:
            lines.append(f"{pre} {r.get('error') or r.get('skipped', '')}"[:120])
            continue
        pages = r.get("pages_recalled_last_step")

        def f(key: str, fmt: str = ".2f", r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if key in r else "-"

        note = "" if r.get("full_kv_allocated", True) else "  (layers share KV)"
        lines.append(
            f"{pre} {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.1f} "
            f"{'-' if pages is None else pages:>10} {f('speedup_vs_dense'):>8} "
            f"{f('speedup_vs_sync'):>8} {f('recall_hidden_share'):>7} "
            f"{f('host_issue_ms'):>8}{note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, references only")
    ap.add_argument("--contexts", default=None, help="default 32768,65536,131072")
    ap.add_argument("--batches", default=None, help="default 1,4,16,32")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 8)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (dry: 1)")
    ap.add_argument("--query-rho", type=float, default=0.95,
                    help="step-to-step correlation of the synthetic queries")  # fmt: skip
    ap.add_argument("--correction-rate", type=float, default=0.1,
                    help="share of KV heads corrected per (step, layer)")  # fmt: skip
    ap.add_argument("--tau", type=float, default=0.8, help="threshold of the flags computed")
    ap.add_argument("--weight-sets", type=int, default=4)
    ap.add_argument("--host-pool-gib", type=float, default=None,
                    help="default: 8, or one request at the largest context if more "
                         "(dry: tiny)")  # fmt: skip
    ap.add_argument("--dense-cap-gib", type=float, default=48.0,
                    help="most GiB of dense KV allocated; beyond it layers share KV")  # fmt: skip
    ap.add_argument("--time-limit-s", type=float, default=300.0,
                    help="cells not started by then are skipped")  # fmt: skip
    ap.add_argument("--graph", action="store_true",
                    help="capture each variant's step in a CUDA graph and time its replays "
                         "(a GPU; not noovl)")  # fmt: skip
    ap.add_argument("--profile", action="store_true",
                    help="per cell, the ops with the most device time (torch profiler)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    a = ap.parse_args(argv)
    dry = a.dry_run
    if a.graph and dry:
        ap.error("--graph needs a GPU (no graph on a CPU)")
    if a.graph and "noovl" in a.variants.split(","):
        a.variants = ",".join(v for v in a.variants.split(",") if v != "noovl")
    s = TINY if dry else FULL
    a.contexts = a.contexts or ("64,128" if dry else "32768,65536,131072")
    a.batches = a.batches or ("1,2" if dry else "1,4,16,32")
    a.steps = a.steps or (2 if dry else 8)
    a.warmup = (1 if dry else 3) if a.warmup is None else a.warmup
    if a.host_pool_gib is None:
        page_gib = s.layers * s.kv_heads * 2 * s.page * s.head_dim * 2 / 2**30
        one_request = max(int(x) for x in a.contexts.split(",")) // s.page * page_gib
        a.host_pool_gib = 64 * page_gib if dry else max(8.0, one_request)
    out = a.out or ROOT / "benchmarks" / "results" / (
        "tmp/decode_gpu_dry_run.json" if dry else "decode_gpu.json"
    )
    res: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dry_run": dry, "shape": asdict(s), "args": {k: str(v) for k, v in vars(a).items()},
    }  # fmt: skip
    t_start = time.perf_counter()
    if not dry:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run", file=sys.stderr)
            return 2
        res["device"] = torch.cuda.get_device_name()
        t0 = time.perf_counter()
        ext = ops.load_extension()
        res["build_s"] = time.perf_counter() - t0
        if ext is None:
            res["build_error"] = ops.load_error()
            print(f"extension build failed:\n{ops.load_error()}", file=sys.stderr)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
            return 1
    torch.manual_seed(0)
    dev = Dev(dry)
    with torch.inference_mode():
        bench(a, dev, s, res)
    res["total_s"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(table(res))
    failed = [r for r in res["rows"] if "error" in r and "out of memory" not in r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
