"""NHD -> HND conversion throughput of the host pool's worker threads, next to memcpy.

Question: how fast do ``ConversionWorkers`` turn SGLang's per-layer NHD K/V rows into HND host
pages, compared with a plain ``memcpy`` of the same bytes into the same arena, in the same run?
Also: host page allocator operations per second (from Python, so binding overhead included).

Method. For each page size, one ``HostPagePool`` holds ``--tokens`` tokens of every layer of the
model preset; each layer has its own NHD K and V source tensors (so sources are not cache
resident). One iteration converts all layers (one job per layer) with ``t`` worker threads, and
the baseline copies the same source bytes into the same arena bytes with ``libc memcpy``
(``ctypes.memmove``, which releases the GIL) from ``t`` Python threads, one layer per call.
Each figure is the best of ``--repeats`` iterations after one warm-up pass (which also faults
the arena in). GB/s counts bytes written (= bytes read).

    python benchmarks/bench_convert.py                      # Llama-3.1-8B, 1..cores threads
    python benchmarks/bench_convert.py --tokens 1024 --repeats 3

Writes JSON to ``benchmarks/results/convert.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from freekv_sglang.host_pool import ConversionWorkers, HostPagePool, PageGeometry, wait_all


@dataclass(frozen=True)
class ModelPreset:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


PRESETS = {
    "llama-3.1-8b": ModelPreset("Llama-3.1-8B", 32, 8, 128, "bfloat16"),
}


def best_of(repeats: int, fn: object) -> float:
    assert callable(fn)
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memcpy_layers(dst: list[torch.Tensor], src: list[torch.Tensor], threads: int) -> None:
    """Copy src[i] -> dst[i] with libc memcpy from ``threads`` threads (round robin)."""

    def run(first: int) -> None:
        for i in range(first, len(src), threads):
            ctypes.memmove(dst[i].data_ptr(), src[i].data_ptr(), src[i].nbytes)

    if threads == 1:
        run(0)
        return
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def bench_page_size(
    preset: ModelPreset, page_size: int, tokens: int, thread_counts: list[int], repeats: int
) -> list[dict[str, object]]:
    g = PageGeometry(
        preset.num_layers, preset.num_kv_heads, page_size, preset.head_dim, preset.dtype
    )
    pages = -(-tokens // page_size)
    pool = HostPagePool(g, pages * g.page_bytes)
    ids = pool.alloc(pages)
    dtype = getattr(torch, preset.dtype)
    shape = (tokens, preset.num_kv_heads, preset.head_dim)
    gen = torch.Generator().manual_seed(0)
    ks = [torch.randn(shape, generator=gen).to(dtype) for _ in range(preset.num_layers)]
    vs = [torch.randn(shape, generator=gen).to(dtype) for _ in range(preset.num_layers)]
    nbytes = 2 * sum(k.nbytes for k in ks)

    # memcpy destinations: the same arena bytes, as 2 * layers contiguous runs.
    arena = pool.arena_view().view(torch.uint8).reshape(-1)
    per = ks[0].nbytes
    dst = [arena[i * per : (i + 1) * per] for i in range(2 * preset.num_layers)]
    src = [t.view(torch.uint8).reshape(-1) for pair in zip(ks, vs, strict=True) for t in pair]

    rows = []
    for threads in thread_counts:
        with ConversionWorkers(pool, num_threads=threads, queue_depth=4 * preset.num_layers) as w:

            def convert(w: ConversionWorkers = w) -> None:
                tickets = [
                    w.submit_nhd_to_hnd(layer, ks[layer], vs[layer], ids)
                    for layer in range(preset.num_layers)
                ]
                wait_all(tickets)

            t_convert = best_of(repeats, convert)
        t_memcpy = best_of(repeats, lambda threads=threads: memcpy_layers(dst, src, threads))
        rows.append(
            {
                "page_size": page_size,
                "threads": threads,
                "bytes": nbytes,
                "convert_gbps": nbytes / t_convert / 1e9,
                "memcpy_gbps": nbytes / t_memcpy / 1e9,
                "ratio": t_memcpy / t_convert,
            }
        )
    # The memcpy baseline overwrote the arena: convert once more and check one page of one
    # layer against a direct torch reference.
    with ConversionWorkers(pool, num_threads=1) as w:
        wait_all([w.submit_nhd_to_hnd(3, ks[3], vs[3], ids)])
    slot = pool.index_of(ids[0])
    want = ks[3][: min(page_size, tokens)].permute(1, 0, 2)
    got = pool.arena_view()[slot, 3, :, 0, : want.shape[1]]
    if not torch.equal(got, want):
        raise SystemExit("conversion output does not match the reference")
    pool.release(ids)
    return rows


def bench_alloc(preset: ModelPreset, iters: int) -> dict[str, float]:
    g = PageGeometry(preset.num_layers, preset.num_kv_heads, 1, preset.head_dim, preset.dtype)
    pool = HostPagePool(g, 4096 * g.page_bytes, pin=False)
    t0 = time.perf_counter()
    for _ in range(iters):
        pool.release(pool.alloc(1))
    single = 2 * iters / (time.perf_counter() - t0)
    batch = 256
    t0 = time.perf_counter()
    for _ in range(iters // 16):
        pool.release(pool.alloc(batch))
    batched = 2 * batch * (iters // 16) / (time.perf_counter() - t0)
    pool.check_invariants()
    return {"single_ops_per_s": single, "batched_pages_per_s": batched, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per layer per iteration")
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--max-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alloc-iters", type=int, default=100_000)
    ap.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "convert.json",
    )
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    threads = list(range(1, args.max_threads + 1))
    rows = [
        row
        for ps in args.page_sizes
        for row in bench_page_size(preset, ps, args.tokens, threads, args.repeats)
    ]
    alloc = bench_alloc(preset, args.alloc_iters)
    result = {
        "preset": asdict(preset),
        "tokens_per_layer": args.tokens,
        "repeats": args.repeats,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
        "convert": rows,
        "alloc": alloc,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"NHD -> HND, {preset.name}, {args.tokens} tokens x {preset.num_layers} layers")
    print("| page size | threads | convert GB/s | memcpy GB/s | convert / memcpy |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['page_size']} | {r['threads']} | {r['convert_gbps']:.2f} "
            f"| {r['memcpy_gbps']:.2f} | {r['ratio']:.0%} |"
        )
    print(
        f"\nalloc+free from Python: {alloc['single_ops_per_s'] / 1e6:.2f} M ops/s single, "
        f"{alloc['batched_pages_per_s'] / 1e6:.2f} M pages/s in batches of {alloc['batch']}"
    )
    print(f"JSON: {args.output}")


if __name__ == "__main__":
    main()
