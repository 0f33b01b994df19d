"""One-shot GPU check of the freekv CUDA ops: build, correctness over the grid, measurements.

Runs on a bare GPU host with only Python >= 3.10, a CUDA build of torch (>= 2.11) and nvcc:
no Rust toolchain, no package installs, no network. It therefore imports only the ops
subpackage (``python/freekv_sglang/ops``), never the Rust extension; torch pinned tensors stand
in for the host pool (same layout as ``HostPagePool.arena_view()``).

Steps, in one process:

1. build the extension (``freekv_sglang.ops._load``; cached on disk);
2. check every op against its pure-torch reference on fresh random data over the grid
   (bf16/fp16 x head_dim 64/128/256 x page size 16/32/64, several GQA group sizes, ragged
   batches); outputs are poisoned before each run; copies must be bit-exact, math within the
   tolerances stated next to each check; ``select_pages`` followed by ``recall_direct`` on
   its work list must leave every budget slot holding its page's K/V; where FlashInfer is
   installed, also the serving path's attention (one token-level paged decode over sink,
   window and budget slots, as FreeKV's FlashInfer backend runs it) against
   ``freekv_sglang.paged_attention``'s reference;
3. measure: the pinned host-to-device (and device-to-host) peak of one large copy; recall
   throughput (the device-driven kernel) at 16 KiB chunks for 1k to 100k chunks; select time
   for batch 1 to 64 at 32K and 128K context against dense decode attention at batch 32, with
   and without the re-ranking stage (``--freekv-rerank 8``, 2-bit codes);
4. print one table (last) and write JSON (``--out``).

``--dry-run`` runs the same harness on CPU with tiny sizes, the references standing in for the
kernels (no build); CI runs it to keep this script working without a GPU.

    python benchmarks/gpu_check.py                 # on a GPU host
    python benchmarks/gpu_check.py --dry-run       # anywhere
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import sys
import time
import traceback
import types
from collections.abc import Callable
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (16, 32, 64)
# (query heads, KV heads): group sizes 1 to 8 (5 and 7 as in Qwen2.5-14B/32B and -7B).
GQA = ((4, 4), (8, 4), (6, 2), (16, 4), (10, 2), (12, 2), (28, 4), (32, 4))


class Ctx:
    """Device, sizes and the result log of one run."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.dev = torch.device("cpu" if dry else "cuda")
        self.checks: list[dict[str, Any]] = []
        self.gen = torch.Generator(device="cpu").manual_seed(2026)

    def pinned(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, pin_memory=not self.dry)

    def randn(self, *shape: int, dtype: torch.dtype, device: torch.device | None = None):
        return torch.randn(*shape, generator=self.gen).to(dtype=dtype, device=device or self.dev)

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def record(self, op: str, case: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"op": op, "case": case, "ok": bool(ok), "detail": detail})


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.element_size() == 2 else x


def _poison16(x: torch.Tensor) -> torch.Tensor:
    x.view(torch.int16).fill_(0x7E7E)
    return x


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


def check_recall(c: Ctx, dt: torch.dtype, d: int, p: int, tag: str) -> None:
    layers, h, pages, slots_pages = 2, 3, 24, 40
    host = c.pinned(pages, layers, h, 2, p, d, dtype=dt)
    host.copy_(c.randn(pages, layers, h, 2, p, d, dtype=dt, device=torch.device("cpu")))
    # Distinct destinations: (layer, head, slot page) drawn without replacement.
    n = 29
    dst = torch.randperm(layers * h * slots_pages, generator=c.gen)[:n]
    lay, rem = dst // (h * slots_pages), dst % (h * slots_pages)
    head, spage = rem // slots_pages, rem % slots_pages
    src = torch.randint(0, pages, (n,), generator=c.gen)
    work = torch.stack((src, lay, head, spage * p), dim=1).to(torch.int32)
    work[5, 0] = -1  # a row with host_page < 0 is skipped
    work[-3:] = -1  # padding rows as the select op writes them

    def buffers() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        kb = [_poison16(torch.empty(slots_pages * p, h, d, dtype=dt, device=c.dev))]
        kb.append(_poison16(torch.empty_like(kb[0])))
        vb = [_poison16(torch.empty_like(kb[0])) for _ in range(layers)]
        return kb, vb

    ek, ev = buffers()
    ops.recall_direct_reference(host, work, ek, ev)
    kb, vb = buffers()
    event = ops.recall_direct(host, work.to(c.dev), kb, vb)
    if event is not None:
        event.synchronize()
    ok = all(torch.equal(_bits(a), _bits(b)) for a, b in zip(kb + vb, ek + ev, strict=True))
    c.record("recall_direct", tag, ok, "bit-exact")


def check_digest(c: Ctx, dt: torch.dtype, d: int, p: int, tag: str) -> None:
    h, n_slots_pages, n_host = 4, 20, 24
    k = c.randn(n_slots_pages * p, h, d, dtype=dt)
    n = 10
    slots = torch.randperm(n_slots_pages - 1, generator=c.gen)[:n] * p  # + p - 1 + 5 fits
    slots[3] += 5  # a page need not start at a page boundary of the buffer
    pages = torch.randperm(n_host, generator=c.gen)[:n]
    pages[7] = -1  # skipped
    args = [t.to(c.dev) for t in (slots, pages)]
    # The kernel also gets entries naming host pages >= N, which it must skip without writing
    # (the reference refuses them).
    kernel = ops._load.extension_for(k) is not None
    extra = torch.tensor([n_host, n_host + 7]) if kernel else torch.empty(0, dtype=torch.int64)
    k_args = [
        torch.cat((slots, slots[: extra.numel()])).to(c.dev),
        torch.cat((pages, extra)).to(c.dev),
    ]
    for kind in ("minmax", "mean"):
        expect = _poison16(torch.empty(n_host, 2, h, d, dtype=dt, device=c.dev))
        got = expect.clone()
        ops.page_digest_reference(k, *args, expect, p, kind)
        ops.page_digest(k, *k_args, got, p, kind)
        if kind == "minmax":
            ok, detail = torch.equal(_bits(got), _bits(expect)), "bit-exact"
        else:
            # float32 sums in another order, then one rounding to 16 bits: 1 ulp of 16-bit.
            tol = 8e-3 if dt == torch.bfloat16 else 1e-3
            diff = (got.float() - expect.float()).abs().nan_to_num(0).max().item()
            same_poison = torch.equal(_bits(got) == 0x7E7E, _bits(expect) == 0x7E7E)
            ok, detail = diff <= tol and same_poison, f"max abs diff {diff:.2e} <= {tol}"
        c.record(f"digest_{kind}", tag, ok, detail)


def _residency(r: int, h: int, s: int, n_p: int, gen: torch.Generator):
    s2p = torch.full((r, h, s), -1, dtype=torch.int64)
    p2s = torch.full((r, h, n_p), -1, dtype=torch.int64)
    for i in range(r):
        for j in range(h):
            pages = torch.randperm(n_p, generator=gen)[:s]
            occ = (torch.rand(s, generator=gen) < 0.75).nonzero().flatten()
            s2p[i, j, occ] = pages[occ]
            p2s[i, j, pages[occ]] = occ
    return s2p, p2s


def _host_pages(r: int, n_p: int, n_host: int, gen: torch.Generator) -> torch.Tensor:
    """``[r, n_p]`` host pages in ``[0, n_host)`` (regions may share pages), about a tenth of
    them without a digest: ``-1`` or an index ``>= n_host``."""
    hp = torch.randint(0, n_host, (r, n_p), generator=gen)
    bad = torch.rand(r, n_p, generator=gen) < 0.1
    beyond = n_host + torch.randint(0, 3, (r, n_p), generator=gen)
    return torch.where(bad, torch.where(torch.rand(r, n_p, generator=gen) < 0.5, -1, beyond), hp)


# The select cases of the grid: reduction, head mask, re-ranking (key bits, candidates): the
# second stage over fewer candidates than pages, and over more than there are.
SELECT_CASES: tuple[tuple[str, bool, tuple[int, int] | None], ...] = (
    ("softmax_mean", False, None),
    ("softmax_mean", True, None),
    ("mean", False, None),
    ("softmax_mean", True, (2, 24)),
    ("max", False, (4, 16)),
    ("mean", False, (2, 64)),
)


def check_select(c: Ctx, dt: torch.dtype, d: int, p: int, tag: str, gqa: tuple[int, int]):
    """``select_pages`` against its reference over `SELECT_CASES`: reduced scores within a
    tolerance, selected sets equal up to near-ties, the delta and the work list exact from the
    kernel's own selection. With re-ranking the digests are the min/max of real pages of keys
    and the key codes theirs; the re-ranked candidates (the pages scored above ``-inf``) must be
    the reference's, up to near-ties of the bound at the candidates' edge, and their logits
    (left in ``raw``) within a tolerance."""
    h_q, h = gqa
    n_host, r, n_p, b, k, s, sink, win = 160, 9, 48, 6, 8, 11, 1, 2
    keys = c.randn(n_host, p, h, d, dtype=dt)
    digests = torch.stack((keys.amin(1), keys.amax(1)), dim=1).contiguous()
    codes = {bits: ops.quantize_page_keys(keys, bits) for bits in ops.RERANK_BITS}
    rows = torch.randperm(r, generator=c.gen)[:b].to(c.dev)
    seq = torch.tensor([p * 3 + 1, p * (sink + win + 5), p * 30 + 9, p * n_p, p * 17, 2])
    s2p0, p2s0 = _residency(r, h, s, n_p, c.gen)
    host_pages = _host_pages(r, n_p, n_host, c.gen).to(c.dev)
    slot_tokens = (torch.randint(0, 1 << 14, (r, s), generator=c.gen) * p).to(c.dev)
    hp_rows = host_pages[rows]
    no_digest = ((hp_rows < 0) | (hp_rows >= n_host)).unsqueeze(1).expand(b, h, n_p)
    for red, masked, second in SELECT_CASES:
        q = c.randn(b, h_q, d, dtype=dt)
        mask = (torch.rand(b, h, generator=c.gen) < 0.5).to(c.dev) if masked else None
        kw: dict[str, Any] = {
            "page_size": p, "num_sink_pages": sink, "num_window_pages": win, "top_k": k,
            "layer": 5, "reduction": red, "head_mask": mask,
        }  # fmt: skip
        if second is not None:
            bound = ops.select_pages_reference(
                q, digests, rows, seq.to(c.dev), s2p0.clone().to(c.dev), p2s0.clone().to(c.dev),
                host_pages, slot_tokens, **kw,
            ).page_scores  # fmt: skip
            kw["rerank"] = ops.Rerank(codes[second[0]], second[0], second[1])
        # Copies (on the CPU ``.to`` would alias the initial residency, which both runs and
        # the delta's recomputation below must see unchanged).
        s2p_r, p2s_r = s2p0.clone().to(c.dev), p2s0.clone().to(c.dev)
        seq_d = seq.to(c.dev)
        ref = ops.select_pages_reference(
            q, digests, rows, seq_d, s2p_r, p2s_r, host_pages, slot_tokens, **kw
        )
        out = ops.SelectOutputs.allocate(b, h_q, h, n_p, k, s, c.dev)
        for t in out:
            t.fill_(-7777) if not t.is_floating_point() else t.fill_(float("nan"))
        s2p_k, p2s_k = s2p0.clone().to(c.dev), p2s0.clone().to(c.dev)
        ops.select_pages(
            q, digests, rows, seq_d, s2p_k, p2s_k, host_pages, slot_tokens, out=out, **kw
        )
        c.sync()
        case = f"{tag} gqa={h_q}/{h} {red}{' masked' if masked else ''}"
        if second is not None:
            case += f" rerank {second[0]}-bit x{second[1]}"
        problems = []
        near = 0
        compared = torch.ones(b, h, dtype=torch.bool, device=c.dev)
        if second is not None:
            # The candidates: the bound's best, taken from float32 sums in another order, so
            # they may differ only by pages whose bound ties the edge within 1e-5 (relative).
            got_c, want_c = ~torch.isneginf(out.page_scores), ~torch.isneginf(ref.page_scores)
            for bi, hi in (got_c != want_c).any(-1).nonzero().tolist():
                top = bound[bi, hi].sort(descending=True).values
                edge = top[min(second[1], n_p) - 1].item()
                diff = (got_c[bi, hi] != want_c[bi, hi]).nonzero().flatten().tolist()
                if all(
                    abs(bound[bi, hi, j].item() - edge) <= 1e-5 * abs(edge) + 1e-9 for j in diff
                ):
                    near += 1
                    compared[bi, hi] = False
                else:
                    problems.append(f"re-ranked candidates differ at b={bi} h={hi}")
            both = (got_c & want_c & compared.unsqueeze(-1)).repeat_interleave(h_q // h, dim=1)
            if not torch.allclose(out.raw[both], ref.raw[both], rtol=1e-4, atol=1e-4):
                err = (out.raw[both] - ref.raw[both]).abs().nan_to_num(1.0).max().item()
                problems.append(f"re-ranked logits max err {err:.2e}")
        # Reduced scores: float32 sums in another order; softmax probabilities ~1/pages.
        cmp = compared.unsqueeze(-1)
        if not torch.allclose(
            torch.where(cmp, out.page_scores, 0.0), torch.where(cmp, ref.page_scores, 0.0),
            rtol=1e-4, atol=1e-6,
        ):  # fmt: skip
            err = (out.page_scores - ref.page_scores).abs().nan_to_num(1.0).max().item()
            problems.append(f"page_scores max err {err:.2e}")
        # A page without a digest (host page < 0 or >= N) is never selectable.
        if not bool(torch.isneginf(out.page_scores[no_digest]).all()):
            problems.append("a page without a digest is scored")
        chosen = out.selected.clamp(min=0)
        if bool((no_digest.gather(-1, chosen) & (out.selected >= 0)).any()):
            problems.append("a page without a digest is selected")
        # Selected sets: equal, except pages whose reference score is within 1e-5 (relative)
        # of the k-th score (near-ties the summation order may flip).
        for bi in range(b):
            for hi in range(h):
                a = set(out.selected[bi, hi].tolist()) - {-1}
                e = set(ref.selected[bi, hi].tolist()) - {-1}
                if a == e or not compared[bi, hi]:
                    continue
                sc = ref.page_scores[bi, hi]
                kth = sc[ref.selected[bi, hi][ref.selected[bi, hi] >= 0][-1]].item()
                if len(a) == len(e) and all(
                    abs(sc[j].item() - kth) <= 1e-5 * abs(kth) + 1e-9 for j in a ^ e
                ):
                    near += 1
                else:
                    problems.append(f"selected differs at b={bi} h={hi}")
        # Delta and work list: exact, recomputed from the kernel's own selection and scores.
        n_s2p, n_p2s, rec, cnt = ops.compute_delta_reference(
            out.selected, out.page_scores, s2p0.to(c.dev)[rows], p2s0.to(c.dev)[rows]
        )
        m3 = (torch.ones(b, h, dtype=torch.bool, device=c.dev) if mask is None else mask)[..., None]
        if not torch.equal(out.recall, torch.where(m3, rec, -1)):
            problems.append("recall")
        if not torch.equal(out.counts, torch.where(m3, cnt, 0)):
            problems.append("counts")
        if not torch.equal(s2p_k[rows], torch.where(m3, n_s2p, s2p0.to(c.dev)[rows])):
            problems.append("slot_to_page")
        if not torch.equal(p2s_k[rows], torch.where(m3, n_p2s, p2s0.to(c.dev)[rows])):
            problems.append("page_to_slot")
        # The work list: one row per (request, KV head, budget slot), -1 where nothing moves.
        moved = out.recall >= 0
        wv = out.work.view(b, h, s, 4).long()
        if not bool((wv[~moved] == -1).all()):
            problems.append("work padding")
        bi, hi, si = moved.nonzero(as_tuple=True)
        want = torch.stack(
            (host_pages[rows[bi], out.recall[bi, hi, si]], torch.full_like(bi, 5), hi,
             slot_tokens[rows[bi], si]), dim=-1,
        )  # fmt: skip
        if not torch.equal(wv[bi, hi, si], want):
            problems.append("work rows")
        ok = not problems
        c.record("select", case, ok, "; ".join(problems) or f"exact delta; {near} near-ties")


def check_select_recall(c: Ctx, dt: torch.dtype, d: int, p: int, tag: str, gqa: tuple[int, int]):
    """``select_pages`` then ``recall_direct`` on its whole work list, over three steps (an
    empty residency, then other queries, the last one with a head mask): after each step every
    budget slot holds exactly the K/V of the host page of the logical page it is resident for,
    per KV head, and every selected page is resident; the other layer is not written."""
    h_q, h = gqa
    layers, layer = 2, 1
    n_host, r, n_p, b, k, s, sink, win = 40, 5, 14, 3, 4, 6, 1, 1
    host = c.pinned(n_host, layers, h, 2, p, d, dtype=dt)
    host.copy_(c.randn(n_host, layers, h, 2, p, d, dtype=dt, device=torch.device("cpu")))
    digests = c.randn(n_host, 2, h, d, dtype=dt)
    digests = torch.stack((digests.amin(1), digests.amax(1)), dim=1).contiguous()
    rows = torch.randperm(r, generator=c.gen)[:b]
    host_pages = _host_pages(r, n_p, n_host, c.gen)
    # Budget slot s of region i: token slots [(i * S + s) * p, (i * S + s + 1) * p).
    slot_tokens = (torch.arange(r * s).view(r, s) * p).to(c.dev)
    seq = torch.tensor([p * n_p, p * 9 + 3, p * n_p - 5]).to(c.dev)
    s2p = torch.full((r, h, s), -1, dtype=torch.int64, device=c.dev)
    p2s = torch.full((r, h, n_p), -1, dtype=torch.int64, device=c.dev)
    kb = [_poison16(torch.empty(r * s * p, h, d, dtype=dt, device=c.dev)) for _ in range(layers)]
    vb = [_poison16(torch.empty_like(kb[0])) for _ in range(layers)]
    hp_dev, rows_dev = host_pages.to(c.dev), rows.to(c.dev)
    problems = []
    for step in range(3):
        q = c.randn(b, h_q, d, dtype=dt)
        mask = (torch.rand(b, h, generator=c.gen) < 0.5).to(c.dev) if step == 2 else None
        out = ops.select_pages(
            q, digests, rows_dev, seq, s2p, p2s, hp_dev, slot_tokens, page_size=p,
            num_sink_pages=sink, num_window_pages=win, top_k=k, layer=layer, head_mask=mask,
        )  # fmt: skip
        event = ops.recall_direct(host, out.work, kb, vb)
        if event is not None:
            event.synchronize()
        c.sync()
        sel, s2p_c, p2s_c = out.selected.cpu(), s2p.cpu(), p2s.cpu()
        kl, vl = kb[layer].cpu(), vb[layer].cpu()
        for bi in range(b):
            row = int(rows[bi])
            for hi in range(h):
                for j in sel[bi, hi][sel[bi, hi] >= 0].tolist():
                    if int(p2s_c[row, hi, j]) < 0:
                        problems.append(f"step {step}: page {j} of b={bi} h={hi} not resident")
                for slot in range(s):
                    j = int(s2p_c[row, hi, slot])
                    if j < 0:
                        continue
                    src = host[int(host_pages[row, j]), layer, hi]
                    t0 = slot * p + row * s * p
                    if not (
                        torch.equal(_bits(kl[t0 : t0 + p, hi]), _bits(src[0]))
                        and torch.equal(_bits(vl[t0 : t0 + p, hi]), _bits(src[1]))
                    ):
                        problems.append(f"step {step}: slot {slot} of b={bi} h={hi}")
        if int(out.counts[..., 1].sum()) == 0 and step == 0:
            problems.append("the first step must recall pages")
    other = layers - 1 - layer
    if not all(bool((_bits(x[other]) == 0x7E7E).all()) for x in (kb, vb)):
        problems.append(f"layer {other} was written")
    c.record("select_recall", f"{tag} gqa={h_q}/{h}", not problems, "; ".join(problems[:4]))


def check_correct(c: Ctx, dt: torch.dtype, d: int, tag: str, gqa: tuple[int, int]) -> None:
    h_q, h = gqa
    b = 7
    q = c.randn(b, h_q, d, dtype=dt)
    q_prev = (q.float() + 0.9 * c.randn(b, h_q, d, dtype=torch.float32)).to(dt)
    q_prev[0, 0] = 0
    tau = 0.7
    f_ref, c_ref = ops.correction_flags_reference(q, q_prev, h, tau)
    cos = torch.full((b, h), float("nan"), device=c.dev)
    flags = torch.ones(b, h, dtype=torch.bool, device=c.dev)
    f, cm = ops.correction_flags(q, q_prev, h, tau, cos, flags)
    decided = (c_ref - tau).abs() > 1e-4
    err = (cm - c_ref).abs().nan_to_num(1.0).max().item()
    ok = err <= 1e-5 and torch.equal(f[decided], f_ref[decided])
    c.record("correct", f"{tag} gqa={h_q}/{h}", ok, f"cos max err {err:.1e} <= 1e-5")


def check_correction_masks(c: Ctx, dt: torch.dtype, d: int, tag: str, gqa: tuple[int, int]) -> None:
    """The decode step's correction masks over the regions' speculation state: requests in
    shuffled regions, some with a speculation made for their length, one with a zero previous
    query; ``have_spec`` must equal the reference's, and ``corrected`` / ``redo`` wherever the
    cosine is not within 1e-4 of tau."""
    h_q, h = gqa
    b, r, tau = 7, 11, 0.74
    regs = torch.randperm(r, generator=c.gen)[:b].to(c.dev)
    seq_lens = torch.randint(40, 90, (b,), generator=c.gen).to(c.dev)
    spec_len = torch.randint(40, 90, (r,), generator=c.gen).to(c.dev)
    spec_len[regs[::2]] = seq_lens[::2]  # every other request has a speculation to check
    q = c.randn(b, h_q, d, dtype=dt)
    q_prev = c.randn(r, h_q, d, dtype=dt)
    q_prev[regs] = (q.float() + 0.9 * c.randn(b, h_q, d, dtype=torch.float32)).to(dt)
    q_prev[regs[0], 0] = 0
    want = ops.correction_masks_reference(q, q_prev, regs, seq_lens, spec_len, h, tau)
    masks = torch.ones(3, b, h, dtype=torch.bool, device=c.dev)
    masks[1] = False
    got = ops.correction_masks(q, q_prev, regs, seq_lens, spec_len, h, tau, masks)
    _, cos = ops.correction_flags_reference(q, q_prev[regs], h, tau)
    decided = (cos - tau).abs() > 1e-4
    ok = got is masks and torch.equal(got[0], want[0])
    ok = ok and all(torch.equal(got[i][decided], want[i][decided]) for i in (1, 2))
    undecided = int((~decided).sum())
    c.record(
        "correction_masks", f"{tag} gqa={h_q}/{h}", ok, f"{undecided} heads within 1e-4 of tau"
    )


def check_commit(c: Ctx, dt: torch.dtype, d: int, p: int, tag: str, gqa: tuple[int, int]) -> None:
    """The speculative selection with its commit (the select kernel's tail): live requests in
    shuffled regions and inert rows (no candidates) sharing one region. The regions'
    speculation state after it (selection, lengths, queries bit for bit, counters) must equal
    the commit reference applied to the kernel's own selection outputs, and the scratch
    region's counters must not move."""
    h_q, h = gqa
    n_host, r, n_p, b, k, s, sink, win = 60, 9, 14, 6, 4, 6, 1, 1
    digests = c.randn(n_host, 2, h, d, dtype=dt)
    digests = torch.stack((digests.amin(1), digests.amax(1)), dim=1).contiguous()
    regs = torch.randperm(r - 1, generator=c.gen)[:b]
    inert = [1, 4]
    regs[inert] = r - 1  # the scratch region
    live = torch.ones(b, dtype=torch.int64)
    live[inert] = 0
    seq = torch.randint(p * 4, p * n_p, (b,), generator=c.gen)
    seq[inert] = 1
    host_pages = _host_pages(r, n_p, n_host, c.gen).to(c.dev)
    slot_tokens = (torch.arange(r * s).view(r, s) * p).to(c.dev)
    s2p = torch.full((r, h, s), -1, dtype=torch.int64, device=c.dev)
    p2s = torch.full((r, h, n_p), -1, dtype=torch.int64, device=c.dev)

    def ints(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=c.gen).to(c.dev)

    q = c.randn(b, h_q, d, dtype=dt)
    masks, corr_counts = ints(0, 2, 3, b, h).bool(), ints(0, k + 1, b, h, 3)
    state = [ints(-1, n_p, r, h, k), ints(0, 99, r), c.randn(r, h_q, d, dtype=dt),
             ints(0, 1000, r, ops.NUM_COUNTERS)]  # fmt: skip
    before = [t.clone() for t in state]
    live, regs, seq = live.to(c.dev), regs.to(c.dev), seq.to(c.dev)
    out = ops.select_pages(
        q, digests, regs, seq, s2p, p2s, host_pages, slot_tokens, page_size=p,
        num_sink_pages=sink, num_window_pages=win, top_k=k, layer=0,
        commit=ops.SpeculationCommit(live, masks, corr_counts, *state),
    )  # fmt: skip
    want = [t.clone() for t in before]
    ref = ops.SpeculationCommit(live, masks, corr_counts, *want)
    ops.commit_speculation_reference(ref, regs, seq, q, out.selected, out.counts)
    names = ("spec_pages", "spec_len", "q_prev", "counts")
    bad = [
        n for n, x, y in zip(names, state, want, strict=True) if not torch.equal(_bits(x), _bits(y))
    ]
    moved = int((state[3][r - 1] != before[3][r - 1]).sum())
    ok = not bad and moved == 0 and int(out.counts[..., 2].sum()) > 0
    c.record("commit", f"{tag} gqa={h_q}/{h}", ok, f"differs: {bad}, scratch moved {moved}")


def _flashinfer_kernels(c: Ctx, dt: torch.dtype, h_q: int, h: int, d: int) -> Any:
    """FreeKV's FlashInfer kernel set on a 128 MB float workspace of its own, with the
    tensor-core decode for GQA groups over 4 (SGLang's choice)."""
    from freekv_sglang.flashinfer_kernels import FlashInferDecodeKernels

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=c.dev)
    return FlashInferDecodeKernels(
        ws, use_tensor_cores=h_q // h > 4, num_qo_heads=h_q, num_kv_heads=h, head_dim=d,
        q_dtype=dt, kv_dtype=dt,
    )  # fmt: skip


def check_flashinfer_decode(c: Ctx, dt: torch.dtype, d: int, gqa: tuple[int, int]) -> None:
    """The serving path's GPU attention: FreeKV's FlashInfer kernel set
    (``FlashInferDecodeKernels``, exactly as the FlashInfer backend drives it) runs one
    token-level paged decode per sparse request (sink + window slots of the KV pool, then its
    budget slots, rows of the same pool past the allocator's: up to 1,800 entries) and the
    single-request decode of dense layers, against the reference kernel set
    (``ReferenceDecodeKernels``) over the same table."""
    from freekv_sglang.ops.page_table import PageTable
    from freekv_sglang.paged_attention import ReferenceDecodeKernels

    h_q, h = gqa
    b, n_pool, n_slots = 7, 5000, 3000
    pool = tuple(c.randn(n_pool + n_slots, h, d, dtype=dt) for _ in range(2))
    q = c.randn(b, h_q, d, dtype=dt)
    # Not the kernels' default scale: a model's own softmax scale must reach every kernel.
    scale = 0.75 * d**-0.5
    fixed = torch.randint(1, 700, (b,), generator=c.gen)
    budget = torch.randint(1, 1100, (b,), generator=c.gen)
    ptr = torch.zeros(b + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(fixed + budget, 0)
    idx = torch.cat([
        torch.cat((torch.randperm(n_pool, generator=c.gen)[: int(nf)],
                   n_pool + torch.randperm(n_slots, generator=c.gen)[: int(nb)]))
        for nf, nb in zip(fixed, budget, strict=True)
    ])  # fmt: skip
    table = PageTable(ptr, idx.to(torch.int32).to(c.dev), torch.ones(b, dtype=torch.int32))
    fi = _flashinfer_kernels(c, dt, h_q, h, d)
    ref = ReferenceDecodeKernels()
    results = []
    for kernels in (fi, ref):
        paged = kernels.paged()
        paged.plan(table, scale, 0.0)
        single = kernels.single(q[0], pool[0][:900], pool[1][:900], scale, 0.0)
        results.append((paged.run(q, pool), single))
    tol = 2e-2 if dt == torch.bfloat16 else 5e-3
    tag = f"{dt} D={d} gqa={h_q}/{h}"
    for name, got, want in (
        ("flashinfer_decode", results[0][0], results[1][0]),
        ("flashinfer_single", results[0][1], results[1][1]),
    ):
        err = (got.float() - want.float()).abs().max().item()
        c.record(name, tag, err <= tol, f"max err {err:.1e}")


def check_flashinfer_graph(c: Ctx, dt: torch.dtype, d: int, gqa: tuple[int, int]) -> None:
    """The decode of SGLang's CUDA-graph runner on the GPU: a FlashInfer decode in fixed form
    (``FlashInferDecodeKernels.paged(FixedTable(...))``, as ``GraphDecode`` makes one per
    captured batch size) is captured in a ``torch.cuda.CUDAGraph`` on one table, planned again
    on another (other lengths and slots, the same batch size: the host part before a replay)
    and replayed; the replay must equal the eager run of the second plan bit for bit, and the
    reference over that table within the dtype's tolerance. Then the dense layers' two parts:
    each part's ``run_with_lse``, merged by the kernel set's ``merge``, against the reference
    over the union of the parts."""
    from freekv_sglang.ops.page_table import PageTable
    from freekv_sglang.paged_attention import FixedTable, ReferenceDecodeKernels

    h_q, h = gqa
    b, n_pool, width = 6, 6000, 900
    pool = tuple(c.randn(n_pool, h, d, dtype=dt) for _ in range(2))
    q = c.randn(b, h_q, d, dtype=dt)
    scale = 0.75 * d**-0.5

    def table(lo: int, hi: int) -> PageTable:
        lens = torch.randint(lo, hi, (b,), generator=c.gen)
        ptr = torch.zeros(b + 1, dtype=torch.int32)
        ptr[1:] = torch.cumsum(lens, 0)
        idx = torch.randperm(n_pool, generator=c.gen)[: int(ptr[-1])].to(torch.int32)
        return PageTable(ptr, idx.to(c.dev), torch.ones(b, dtype=torch.int32), width)

    fi = _flashinfer_kernels(c, dt, h_q, h, d)
    ref = ReferenceDecodeKernels()
    tag = f"{dt} D={d} gqa={h_q}/{h}"
    tol = 2e-2 if dt == torch.bfloat16 else 5e-3
    fixed = FixedTable(b, b * width, "whole")
    paged = fi.paged(fixed)
    paged.plan(table(1, 200), scale, 0.0)
    paged.run(q, pool)  # warm-up, as SGLang's runner does before a capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged.run(q, pool)
    second = table(300, width)
    paged.plan(second, scale, 0.0)
    graph.replay()
    eager = paged.run(q, pool)
    want = ref.paged(fixed)
    want.plan(second, scale, 0.0)
    err = (out.float() - want.run(q, pool).float()).abs().max().item()
    ok = torch.equal(out, eager) and err <= tol
    c.record(
        "flashinfer_graph", tag, ok, f"replay == eager: {torch.equal(out, eager)}, err {err:.1e}"
    )
    # Two disjoint parts of one table, merged by their LSEs.
    whole = table(2, width)
    ptr = whole.kv_indptr
    cut = (ptr[:-1] + (ptr[1:] - ptr[:-1]) // 2).tolist()
    idx = whole.kv_indices.cpu()
    parts = []
    for sl in ((lambda i: slice(int(ptr[i]), cut[i])), (lambda i: slice(cut[i], int(ptr[i + 1])))):
        pieces = [idx[sl(i)] for i in range(b)]
        pp = torch.zeros(b + 1, dtype=torch.int32)
        pp[1:] = torch.cumsum(torch.tensor([x.numel() for x in pieces]), 0)
        parts.append(
            PageTable(pp, torch.cat(pieces).to(c.dev), torch.ones(b, dtype=torch.int32), width)
        )
    runs = []
    for part, share in zip(parts, ("pool", "store"), strict=True):
        dec = fi.paged(FixedTable(b, b * width, share))
        dec.plan(part, scale, 0.0)
        runs.append(dec.run_with_lse(q, pool))
    merged = fi.merge(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    full = ref.paged()
    full.plan(whole, scale, 0.0)
    err = (merged.float() - full.run(q, pool).float()).abs().max().item()
    c.record("flashinfer_merge", tag, err <= tol, f"max err {err:.1e}")


def run_checks(c: Ctx) -> None:
    grid = [
        (name, dt, d, p)
        for name, dt in DTYPES.items()
        for d in ((64,) if c.dry else HEAD_DIMS)
        for p in ((16,) if c.dry else PAGE_SIZES)
    ]
    for i, (name, dt, d, p) in enumerate(grid):
        tag = f"{name} D={d} p={p}"
        gqa = GQA[i % len(GQA)]
        jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (check_recall, (c, dt, d, p, tag)),
            (check_digest, (c, dt, d, p, tag)),
            (check_select, (c, dt, d, p, tag, gqa)),
            (check_select, (c, dt, d, p, tag, GQA[(i + 2) % len(GQA)])),
            (check_select_recall, (c, dt, d, p, tag, gqa)),
            (check_correct, (c, dt, d, tag, gqa)),
            (check_correction_masks, (c, dt, d, tag, gqa)),
            (check_commit, (c, dt, d, p, tag, gqa)),
        ]
        for fn, fn_args in jobs:
            try:
                fn(*fn_args)
            except Exception as e:  # recorded as a failed check, the run goes on
                c.record("error", f"{fn.__name__} {tag}", False, f"{type(e).__name__}: {e}")
                traceback.print_exc()
    if c.dry or importlib.util.find_spec("flashinfer") is None:
        return  # FlashInfer runs on a GPU only, and a bare GPU host may not have it
    for name, dt in DTYPES.items():
        for d in (64, 128):
            for gqa in GQA:
                for check in (check_flashinfer_decode, check_flashinfer_graph):
                    try:
                        check(c, dt, d, gqa)
                    except Exception as e:  # recorded as a failed check, the run goes on
                        tag = f"{check.__name__} {name} D={d} gqa={gqa}"
                        c.record("error", tag, False, f"{type(e).__name__}: {e}")
                        traceback.print_exc()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def timed(c: Ctx, fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` (CUDA events on the current stream; wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    c.sync()
    times = []
    for _ in range(reps):
        if c.dry:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def bench_peaks(c: Ctx, res: dict[str, Any]) -> None:
    nbytes = (1 << 20) if c.dry else (1 << 30)
    host = c.pinned(nbytes, dtype=torch.uint8)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=c.dev)
    t_h2d = timed(c, lambda: dev.copy_(host, non_blocking=True), reps=5)
    t_d2h = timed(c, lambda: host.copy_(dev, non_blocking=True), reps=5)
    res["peak_copy_MiB"] = nbytes / 2**20
    res["h2d_peak_GBps"] = nbytes / t_h2d / 1e9
    res["d2h_peak_GBps"] = nbytes / t_d2h / 1e9


def _chunk_work(ids: torch.Tensor, h: int, p: int) -> torch.Tensor:
    """Work rows ``[n, 4]`` int32 that copy host chunks ``ids`` (page * h + head, layer 0) to
    consecutive page slots per head (distinct (slot, head) targets)."""
    page, head = ids // h, ids % h
    rank = torch.zeros_like(ids)
    for hh in range(h):
        sel = (head == hh).nonzero().flatten()
        rank[sel] = torch.arange(sel.numel())
    return torch.stack((page, torch.zeros_like(page), head, rank * p), 1).to(torch.int32)


def bench_recall(c: Ctx, res: dict[str, Any]) -> None:
    dt, d, p, h = torch.bfloat16, 128, 32, 8  # 2 * 32 * 128 * 2 B = 16 KiB chunks
    counts = [64, 256] if c.dry else [1024, 4096, 16384, 65536, 102400]
    pages = -(-max(counts) // h)
    host = c.pinned(pages, 1, h, 2, p, d, dtype=dt)
    host.view(torch.int16)[:: max(1, pages // 64)].fill_(3)  # touch; contents do not matter
    kb = [torch.empty(pages * p, h, d, dtype=dt, device=c.dev)]
    vb = [torch.empty_like(kb[0])]
    chunk = 2 * p * d * 2
    perm = torch.randperm(pages * h, generator=c.gen)
    rows_out = []
    for n in counts:
        for order in ("random", "sorted"):
            ids = perm[:n] if order == "random" else perm[:n].sort().values
            work_dev = _chunk_work(ids, h, p).to(c.dev)
            recall = functools.partial(ops.recall_direct, host, work_dev, kb, vb)
            t = timed(c, recall, reps=3)
            rows_out.append({
                "chunks": n, "order": order, "MiB": n * chunk / 2**20,
                "direct_GBps": n * chunk / t / 1e9,
            })  # fmt: skip
    res["recall"] = rows_out
    # How few blocks keep PCIe busy: the largest random list at a range of block counts (the
    # default, ops.recall_ctas, is marked). Fewer blocks leave SMs to the compute a
    # speculative recall runs beside.
    n = counts[-2] if len(counts) > 1 else counts[-1]
    work_dev = _chunk_work(perm[:n], h, p).to(c.dev)
    default = ops.recall_ctas(work_dev.device)
    sweep = []
    for ctas in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, default}):
        recall = functools.partial(ops.recall_direct, host, work_dev, kb, vb, ctas=ctas)
        t = timed(c, recall, reps=3)
        sweep.append({"ctas": ctas, "chunks": n, "direct_GBps": n * chunk / t / 1e9,
                      "default": ctas == default})  # fmt: skip
    res["recall_ctas"] = sweep


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention of one layer with GQA: the G query heads of a KV head are the query
    rows of that head (``q [B, H, G, D]``, ``k, v [B, H, L, D]``), so nothing is expanded."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def bench_select(c: Ctx, res: dict[str, Any]) -> None:
    dt, h_q, h, d, p, k = torch.bfloat16, 32, 8, 128, 32, 32  # Llama-3.1-8B geometry
    sink = win = 16  # 512 + 512 tokens, 32 selected pages: the 2048-token budget
    batches = [1, 2] if c.dry else [1, 8, 32, 64]
    contexts = [2048] if c.dry else [32768, 131072]
    out_rows = []
    attention: dict[int, dict[str, float]] = {}
    b_att = 2 if c.dry else 32
    for ctx in contexts:
        n_p = ctx // p
        for b in batches:
            # One digest per host page; request i's pages are host pages [i * P, (i + 1) * P).
            digests = torch.randn(b * n_p, 2, h, d, device=c.dev).to(dt)  # made on the device
            rows = torch.arange(b, device=c.dev)
            seq = torch.full((b,), ctx, dtype=torch.int64, device=c.dev)
            s2p = torch.full((b, h, k), -1, dtype=torch.int64, device=c.dev)
            p2s = torch.full((b, h, n_p), -1, dtype=torch.int64, device=c.dev)
            host_pages = torch.arange(b * n_p, device=c.dev).view(b, n_p)
            slot_tokens = torch.arange(b * k, device=c.dev).view(b, k) * p
            qs = [torch.randn(b, h_q, d, device=c.dev).to(dt) for _ in range(2)]
            out = ops.SelectOutputs.allocate(b, h_q, h, n_p, k, k, c.dev)
            state = (digests, rows, seq, s2p, p2s, host_pages, slot_tokens)
            # The second stage as --freekv-rerank 8 --freekv-rerank-bits 2 runs it: 8 x 32
            # candidates per KV head, key codes of every page (their values do not change the
            # work).
            codes = torch.randint(0, 256, (b * n_p, h, p, d // 4), dtype=torch.uint8, device=c.dev)
            times: dict[str, float] = {}
            for name, rerank in (("select", None), ("rerank", ops.Rerank(codes, 2, 8 * k))):
                it = [0]

                def step(qs=qs, state=state, out=out, it=it, rerank=rerank) -> None:
                    it[0] += 1  # alternate queries so that every step recalls some pages
                    ops.select_pages(
                        qs[it[0] % 2], *state, page_size=p, num_sink_pages=sink,
                        num_window_pages=win, top_k=k, layer=1, out=out, rerank=rerank,
                    )  # fmt: skip

                times[name] = timed(c, step, reps=3 if c.dry else 20, warmup=2)
            recalled = int(out.counts[..., 1].sum().item())
            out_rows.append({
                "batch": b, "context": ctx, "select_us": times["select"] * 1e6,
                "select_rerank_us": times["rerank"] * 1e6, "recalled_pages_last_step": recalled,
            })  # fmt: skip
            del digests, p2s, state, codes
        # Dense decode attention of one layer at batch 32 (the attention FreeKV replaces), and
        # the sparse attention over the 2048-token budget, as the yardsticks of select time.
        attention[ctx] = {}
        for name, length in (("dense", ctx), ("budget", 2048 if not c.dry else 256)):
            q = c.randn(b_att, h, h_q // h, d, dtype=dt)
            kk = torch.empty(b_att, h, length, d, dtype=dt, device=c.dev).normal_()
            vv = torch.empty_like(kk).normal_()
            t_att = timed(c, lambda q=q, kk=kk, vv=vv: _sdpa(q, kk, vv), reps=10)
            attention[ctx][name + "_us"] = t_att * 1e6
            del kk, vv
    res["select"] = out_rows
    res["attention"] = {"batch": b_att, **{str(k2): v for k2, v in attention.items()}}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(res: dict[str, Any], checks: list[dict[str, Any]]) -> str:
    lines = []
    n_ok = sum(x["ok"] for x in checks)
    lines.append(f"{'metric':<58} {'value':>12}  target")
    lines.append("-" * 90)
    lines.append(f"{'correctness checks passed':<58} {f'{n_ok}/{len(checks)}':>12}  all")
    for op in sorted({x["op"] for x in checks}):
        mine = [x for x in checks if x["op"] == op]
        frac = f"{sum(x['ok'] for x in mine)}/{len(mine)}"
        lines.append(f"  {op:<56} {frac:>12}")
    if "build_s" in res:
        lines.append(f"{'extension build (s)':<58} {res['build_s']:>12.1f}")
    if "h2d_peak_GBps" in res:
        peak = res["h2d_peak_GBps"]
        lines.append(f"{'pinned H2D peak, one 1 GiB copy (GB/s)':<58} {peak:>12.1f}")
        lines.append(
            f"{'pinned D2H peak, one 1 GiB copy (GB/s)':<58} {res['d2h_peak_GBps']:>12.1f}"
        )
        for r in res.get("recall", []):
            g = r["direct_GBps"]
            name = f"recall {r['chunks']} x 16 KiB {r['order']} (GB/s, % peak)"
            lines.append(f"{name:<58} {g:>6.1f} {100 * g / peak:>4.0f}%  >= 85%")
        for r in res.get("recall_ctas", []):
            g = r["direct_GBps"]
            mark = "  (default)" if r["default"] else ""
            name = f"recall {r['chunks']} x 16 KiB random, {r['ctas']} blocks (GB/s, % peak)"
            lines.append(f"{name:<58} {g:>6.1f} {100 * g / peak:>4.0f}%{mark}")
    att = res.get("attention", {})
    b_att = att.get("batch")
    for r in res.get("select", []):
        name = f"select B={r['batch']} ctx={r['context']} (us)"
        a = att.get(str(r["context"]))
        extra = ""
        if a and r["batch"] == b_att:
            extra = f"  {100 * r['select_us'] / a['dense_us']:.1f}% of dense attention, < 5%"
        lines.append(f"{name:<58} {r['select_us']:>12.1f}{extra}")
        name = f"select + rerank 8x32, 2-bit B={r['batch']} ctx={r['context']} (us)"
        ratio = r["select_rerank_us"] / r["select_us"]
        lines.append(f"{name:<58} {r['select_rerank_us']:>12.1f}  {ratio:.2f}x select")
    for ctx, a in att.items():
        if ctx == "batch":
            continue
        name = f"decode attention B={b_att} ctx={ctx}, dense (us)"
        lines.append(f"{name:<58} {a['dense_us']:>12.1f}")
        name = f"decode attention B={b_att} ctx={ctx}, 2048 budget (us)"
        lines.append(f"{name:<58} {a['budget_us']:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, references only")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--skip-bench", action="store_true", help="correctness only")
    args = ap.parse_args(argv)
    dry = args.dry_run
    out = args.out or ROOT / "benchmarks" / "results" / (
        "tmp/gpu_check_dry_run.json" if dry else "gpu_check.json"
    )
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "dry_run": dry,
    }  # fmt: skip
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
    c = Ctx(dry)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    run_checks(c)
    res["checks_s"] = time.perf_counter() - t0
    res["checks"] = c.checks
    if not args.skip_bench:
        for bench in (bench_peaks, bench_recall, bench_select):
            try:
                bench(c, res)
            except Exception as e:  # keep what was measured
                res.setdefault("bench_errors", []).append(f"{bench.__name__}: {e!r}")
                traceback.print_exc()
            if not dry:
                torch.cuda.empty_cache()
    res["total_s"] = time.perf_counter() - t_start
    failed = [x for x in c.checks if not x["ok"]]
    for x in failed:
        print(f"FAILED {x['op']} [{x['case']}]: {x['detail']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(table(res, c.checks))
    return 1 if failed or res.get("bench_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
