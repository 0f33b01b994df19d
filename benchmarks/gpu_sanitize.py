"""One small selection and its recall on the device, for ``compute-sanitizer`` (memcheck and
racecheck; ``scripts/gpu_run.sh``, step ``sanitize``): every launch of the serving path's
select and recall kernels at a size the tools run in seconds.

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --dry-run     # anywhere: CPU, the references
"""

from __future__ import annotations

import argparse

import torch

from freekv_sglang.ops import recall_direct, select_pages


def run(device: torch.device) -> int:
    """Select 4 of 40 pages for 2 requests (GQA 4/2, D 64, pages of 16) twice, recalling the
    delta each time; returns the pages recalled."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    b, h_q, h, d, p, n_pages, k, regions = 2, 4, 2, 64, 16, 40, 4, 3
    host_pages = regions * n_pages + 8
    digests = torch.randn(host_pages, 2, h, d, generator=g).to(device, dt)
    host_kv = torch.randn(host_pages, 1, h, 2, p, d, generator=g).to(dt)
    if device.type == "cuda":
        host_kv = host_kv.pin_memory()
    index = torch.randperm(host_pages, generator=g)[: regions * n_pages].view(regions, n_pages)
    host_index = index.to(device, torch.int64)
    slot_tokens = (torch.arange(regions * k, dtype=torch.int64) * p).view(regions, k).to(device)
    s2p = torch.full((regions, h, k), -1, dtype=torch.int64, device=device)
    p2s = torch.full((regions, h, n_pages), -1, dtype=torch.int64, device=device)
    k_buf = torch.zeros(regions * k * p, h, d, dtype=dt, device=device)
    v_buf = torch.zeros_like(k_buf)
    rows = torch.tensor([2, 0], device=device)
    recalled = 0
    for step in range(2):
        q = torch.randn(b, h_q, d, generator=g).to(device, dt)
        lens = torch.tensor([n_pages * p - step, 30 * p], device=device)
        res = select_pages(
            q, digests, rows, lens, s2p, p2s, host_index, slot_tokens, page_size=p,
            num_sink_pages=1, num_window_pages=2, top_k=k, layer=0,
        )  # fmt: skip
        recall_direct(host_kv, res.work, [k_buf], [v_buf])
        recalled += int(res.counts[..., 1].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return recalled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, the pure-torch references")
    args = ap.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    print(f"select and recall on {device}: {run(device)} pages recalled", flush=True)


if __name__ == "__main__":
    main()
