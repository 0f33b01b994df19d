"""The project's CUDA kernels and launchers executed on the CPU (the emulated build: the same
sources over ``cuda/emu``, ``FREEKV_OPS=emulated``) against the pure-torch references.

The grid is ``benchmarks/gpu_check.py``'s, one test per geometry so that a failing case names
itself (gpu_check runs the same checks on a GPU): bf16 and fp16, head dim 64/128/256, page size
16/32/64, GQA group sizes 1 to 8 (two per geometry, each on four), every op, outputs poisoned
before each run, copies compared bit for bit. The select op is also checked at the serving
sizes (4096 pages, top-k and slots 512, hundreds of candidates per thread block), with exactly
tied scores, NaN and infinite scores, and the ``max`` reduction: there the whole outputs must
equal the reference's. The selection's second stage (re-ranking from key codes) runs in the
grid's select cases and at its own limit (512 candidates per KV head). The decode step's correction masks and the speculative selection's
commit run on the same grid (inert rows sharing a region included). ``select_pages`` followed by ``recall_direct`` on its work list runs
through the emulated build and through the references alike: the budget slots must then hold
the selected pages' K/V.

The first test of a session builds the emulated extension (about two minutes on two cores;
cached on disk by the sources' hash).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from benchmarks import gpu_check
from freekv_sglang import ops
from freekv_sglang.ops import _load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    _load.load_emulated_extension()  # built once, before the first case's clock starts
    return gpu_check


@pytest.fixture(autouse=True)
def _emulated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("FREEKV_OPS", "emulated")
    yield


GEOMETRIES = [
    (name, d, p) for name in ("bf16", "fp16") for d in (64, 128, 256) for p in (16, 32, 64)
]


@pytest.mark.parametrize(
    ("dtype", "d", "p"), GEOMETRIES, ids=[f"{n}-D{d}-p{p}" for n, d, p in GEOMETRIES]
)
def test_ops_match_references(gc: ModuleType, dtype: str, d: int, p: int) -> None:
    c = gc.Ctx(True)  # CPU tensors: with FREEKV_OPS=emulated every op runs the emulated build
    dt = gc.DTYPES[dtype]
    tag = f"{dtype} D={d} p={p}"
    gc.check_recall(c, dt, d, p, tag)
    gc.check_digest(c, dt, d, p, tag)
    # Two GQA shapes per geometry, rotating: every group size 1 to 8 runs on four geometries.
    i = GEOMETRIES.index((dtype, d, p))
    for gqa in (gc.GQA[i % len(gc.GQA)], gc.GQA[(i + 3) % len(gc.GQA)]):
        gc.check_select(c, dt, d, p, tag, gqa)
        gc.check_correct(c, dt, d, tag, gqa)
        gc.check_correction_masks(c, dt, d, tag, gqa)
        gc.check_commit(c, dt, d, p, tag, gqa)
    gc.check_select_recall(c, dt, d, p, tag, gc.GQA[i % len(gc.GQA)])
    failed = [f"{x['op']} [{x['case']}]: {x['detail']}" for x in c.checks if not x["ok"]]
    assert not failed, "\n".join(failed)
    assert {x["op"] for x in c.checks} == {
        "recall_direct", "digest_minmax", "digest_mean", "select", "correct", "select_recall",
        "correction_masks", "commit",
    }  # fmt: skip


SELECT_RECALL = [
    ("bf16", 64, 16, (8, 4)),
    ("fp16", 128, 32, (6, 2)),
    ("bf16", 256, 64, (4, 4)),
    ("fp16", 64, 64, (28, 4)),
    ("bf16", 128, 16, (10, 2)),
    ("fp16", 256, 32, (32, 4)),
]


@pytest.mark.parametrize("impl", ["emulated", "reference"])
@pytest.mark.parametrize(
    ("dtype", "d", "p", "gqa"),
    SELECT_RECALL,
    ids=[f"{n}-D{d}-p{p}-gqa{a}/{b}" for n, d, p, (a, b) in SELECT_RECALL],
)
def test_select_then_recall_fills_the_budget_slots(
    gc: ModuleType, impl: str, dtype: str, d: int, p: int, gqa: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The work list contract end to end: ``select_pages`` (regions with pages without a
    digest, a head mask on the last step) then ``recall_direct`` on the whole work list; every
    resident budget slot then holds its host page's K and V for its KV head, bit for bit."""
    if impl == "reference":
        monkeypatch.setenv("FREEKV_OPS", "reference")
    c = gc.Ctx(True)
    gc.check_select_recall(c, gc.DTYPES[dtype], d, p, f"{impl} {dtype} D={d} p={p}", gqa)
    assert [x["op"] for x in c.checks] == ["select_recall"]
    failed = [f"[{x['case']}]: {x['detail']}" for x in c.checks if not x["ok"]]
    assert not failed, "\n".join(failed)


def test_the_emulated_build_is_what_runs() -> None:
    """With FREEKV_OPS=emulated, CPU tensors go to the emulated extension (not the reference)."""
    ext = _load.extension_for(torch.empty(1))
    assert ext is _load.load_emulated_extension()
    assert ext.__name__ == "freekv_ops_emu"


def _select_inputs(
    g: torch.Generator, *, b: int, h_q: int, h: int, d: int, n_p: int, s: int, p: int,
    dtype: torch.dtype, digests: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    r = b + 1
    if digests is None:  # one per host page; request rows use host pages [0, r * n_p)
        x = torch.randn(r * n_p, 2, h, d, generator=g)
        digests = torch.stack((x.amin(1), x.amax(1)), dim=1)
    s2p = torch.full((r, h, s), -1, dtype=torch.int64)
    p2s = torch.full((r, h, n_p), -1, dtype=torch.int64)
    for i in range(r):  # a consistent residency: a third of the slots hold random pages
        for j in range(h):
            pages = torch.randperm(n_p, generator=g)[: s // 3]
            s2p[i, j, : len(pages)] = pages
            p2s[i, j, pages] = torch.arange(len(pages))
    return {
        "q": torch.randn(b, h_q, d, generator=g).to(dtype),
        "digests": digests.to(dtype).contiguous(),
        "rows": torch.randperm(r, generator=g)[:b],
        "seq_lens": torch.full((b,), n_p * p, dtype=torch.int64),
        "slot_to_page": s2p,
        "page_to_slot": p2s,
        "host_pages": torch.randperm(r * n_p, generator=g).view(r, n_p),
        "slot_tokens": torch.randint(0, 1 << 14, (r, s), generator=g) * p,
    }


def _run_both(inputs: dict[str, Any], **kw: Any) -> tuple[Any, Any, dict, dict]:
    """The emulated op and the reference on copies of the same inputs; outputs poisoned."""
    mine = {k: v.clone() for k, v in inputs.items()}
    ref_in = {k: v.clone() for k, v in inputs.items()}
    q, dig, s2p = mine["q"], mine["digests"], mine["slot_to_page"]
    out = ops.SelectOutputs.allocate(
        q.shape[0], q.shape[1], dig.shape[2], mine["host_pages"].shape[1], kw["top_k"],
        s2p.shape[-1], "cpu",
    )  # fmt: skip
    for t in out:
        t.fill_(-7777) if not t.is_floating_point() else t.fill_(float("nan"))
    args = ("q", "digests", "rows", "seq_lens", "slot_to_page", "page_to_slot", "host_pages", "slot_tokens")  # fmt: skip
    got = ops.select_pages(*(mine[a] for a in args), out=out, **kw)
    want = ops.select_pages_reference(*(ref_in[a] for a in args), **kw)
    return got, want, mine, ref_in


def _assert_equal_selection(got: Any, want: Any, mine: dict, ref_in: dict) -> None:
    assert torch.allclose(got.page_scores, want.page_scores, rtol=1e-4, atol=1e-6, equal_nan=False)
    for name in ("selected", "recall", "counts", "work"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(mine["slot_to_page"], ref_in["slot_to_page"])
    assert torch.equal(mine["page_to_slot"], ref_in["page_to_slot"])


def _assert_selection_up_to_near_ties(
    got: Any, want: Any, mine: dict, inputs: dict, k: int
) -> torch.Tensor:
    """``k`` pages selected per (request, KV head) on both sides, the sets equal except pages
    within 1e-5 (relative) of the reference's k-th score; the delta, recomputed by the
    reference from the kernel's own selection and scores, exact. Returns its recall."""
    rows = inputs["rows"]
    b, h = got.selected.shape[:2]
    for bi in range(b):
        for hi in range(h):
            sc = want.page_scores[bi, hi]
            kth = sc[want.selected[bi, hi][-1]].item()
            a = set(got.selected[bi, hi].tolist()) - {-1}
            e = set(want.selected[bi, hi].tolist()) - {-1}
            assert len(a) == len(e) == k, (bi, hi)
            far = [j for j in a ^ e if abs(sc[j].item() - kth) > 1e-5 * abs(kth) + 1e-9]
            assert not far, (bi, hi, far)
    s2p, p2s, rec, cnt = ops.compute_delta_reference(
        got.selected, got.page_scores, inputs["slot_to_page"][rows], inputs["page_to_slot"][rows]
    )
    assert torch.equal(got.recall, rec) and torch.equal(got.counts, cnt)
    assert torch.equal(mine["slot_to_page"][rows], s2p)
    assert torch.equal(mine["page_to_slot"][rows], p2s)
    return rec


@pytest.mark.parametrize(
    ("h_q", "h", "reduction"),
    [(28, 4, "softmax_mean"), (10, 2, "mean"), (8, 1, "max")],
    ids=["gqa7-softmax_mean", "gqa5-mean", "gqa8-max"],
)
def test_select_at_serving_sizes(h_q: int, h: int, reduction: str) -> None:
    """4096 pages (over 4000 candidates for 256 threads), top-k 512 of 512 slots. Scores are
    fp32 sums in another order than torch's, so the selected sets may differ only by pages
    within 1e-5 (relative) of the k-th score; the delta, recomputed by the reference from the
    kernel's own selection and scores, and the work list must then be exact."""
    g = torch.Generator().manual_seed(11)
    inputs = _select_inputs(g, b=2, h_q=h_q, h=h, d=64, n_p=4096, s=512, p=16, dtype=torch.bfloat16)  # fmt: skip
    kw = {"page_size": 16, "num_sink_pages": 4, "num_window_pages": 8, "top_k": 512, "layer": 3, "reduction": reduction}  # fmt: skip
    got, want, mine, _ = _run_both(inputs, **kw)
    assert torch.allclose(got.page_scores, want.page_scores, rtol=1e-4, atol=1e-6)
    rows = inputs["rows"]
    rec = _assert_selection_up_to_near_ties(got, want, mine, inputs, 512)
    moved = rec >= 0
    wv = got.work.view(2, h, 512, 4).long()
    assert bool((wv[~moved] == -1).all())
    bi, hi, si = moved.nonzero(as_tuple=True)
    want_rows = torch.stack(
        (inputs["host_pages"][rows[bi], rec[bi, hi, si]], torch.full_like(bi, 3), hi,
         inputs["slot_tokens"][rows[bi], si]), dim=-1,
    )  # fmt: skip
    assert torch.equal(wv[bi, hi, si], want_rows)


@pytest.mark.parametrize(
    ("bits", "h_q", "h"), [(2, 28, 4), (4, 24, 2)], ids=["2bit-gqa7", "4bit-gqa12"]
)
def test_select_rerank_at_serving_sizes(bits: int, h_q: int, h: int) -> None:
    """The second stage at its limit: 512 candidates of about 1000 per (request, KV head),
    groups of 7 and of 12 (two passes of the kernel's 8 query heads over each page's codes),
    top-k 64, digests and key codes of real pages. The candidates are the bound's best
    512 in both (unless a bound score ties the 512th within 1e-5), their re-ranked scores and
    logits agree within float32 summation order, the selection up to near-ties of the k-th
    score, and the delta recomputed from the kernel's own selection is exact."""
    g = torch.Generator().manual_seed(12 + bits)
    b, d, n_p, p, k = 2, 64, 1024, 16, 64
    keys = torch.randn(3 * n_p, p, h, d, generator=g).to(torch.bfloat16)
    digests = torch.stack((keys.amin(1), keys.amax(1)), dim=1)
    inputs = _select_inputs(g, b=b, h_q=h_q, h=h, d=d, n_p=n_p, s=k, p=p, dtype=torch.bfloat16, digests=digests)  # fmt: skip
    kw: dict[str, Any] = {"page_size": p, "num_sink_pages": 4, "num_window_pages": 8, "top_k": k, "layer": 3}  # fmt: skip
    bound = ops.select_pages_reference(*(v.clone() for v in inputs.values()), **kw).page_scores
    kw["rerank"] = ops.Rerank(ops.quantize_page_keys(keys, bits), bits, 512)
    got, want, mine, _ = _run_both(inputs, **kw)
    cand = torch.isfinite(want.page_scores)
    assert int(cand.sum()) == b * h * 512
    for bi, hi in (torch.isfinite(got.page_scores) != cand).any(-1).nonzero().tolist():
        edge = bound[bi, hi].sort(descending=True).values[511].item()
        diff = (torch.isfinite(got.page_scores[bi, hi]) != cand[bi, hi]).nonzero().flatten()
        assert all(abs(bound[bi, hi, j].item() - edge) <= 1e-5 * abs(edge) for j in diff.tolist())
    assert torch.allclose(got.page_scores, want.page_scores, rtol=1e-4, atol=1e-6)
    both = cand.repeat_interleave(h_q // h, dim=1)
    assert torch.allclose(got.raw[both], want.raw[both], rtol=1e-4, atol=1e-4)
    _assert_selection_up_to_near_ties(got, want, mine, inputs, k)


def test_select_rerank_without_host_pages() -> None:
    """An empty host pool (N = 0): no page is selectable, so nothing is re-ranked or selected,
    in the kernel and the reference alike (the reference reads no code row)."""
    g = torch.Generator().manual_seed(5)
    h_q, h, d, p = 4, 2, 64, 16
    inputs = _select_inputs(g, b=2, h_q=h_q, h=h, d=d, n_p=8, s=4, p=p, dtype=torch.bfloat16, digests=torch.zeros(0, 2, h, d))  # fmt: skip
    codes = torch.zeros(0, h, p, d // 4, dtype=torch.uint8)
    kw = {"page_size": p, "num_sink_pages": 1, "num_window_pages": 1, "top_k": 4, "layer": 0, "rerank": ops.Rerank(codes, 2, 8)}  # fmt: skip
    got, want, mine, ref_in = _run_both(inputs, **kw)
    _assert_equal_selection(got, want, mine, ref_in)
    assert bool(torch.isneginf(got.page_scores).all()) and bool((got.selected == -1).all())


def test_select_ties_go_to_the_lower_page() -> None:
    """Every page has the same digest, so every score ties exactly on both sides: the selected
    pages are the lowest candidates, in page order, and the delta is exact."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 2, 2, 64, generator=g)
    digests = torch.stack((x.amin(1), x.amax(1)), dim=1).expand(3 * 700, 2, 2, 64).contiguous()
    inputs = _select_inputs(g, b=2, h_q=6, h=2, d=64, n_p=700, s=64, p=16, dtype=torch.float16, digests=digests)  # fmt: skip
    kw = {"page_size": 16, "num_sink_pages": 2, "num_window_pages": 2, "top_k": 64, "layer": 0}
    got, want, mine, ref_in = _run_both(inputs, **kw)
    _assert_equal_selection(got, want, mine, ref_in)
    assert got.selected[0, 0].tolist() == list(range(2, 66))


@pytest.mark.parametrize("reduction", ["softmax_mean", "mean", "max"])
def test_select_with_nan_and_infinite_scores(reduction: str) -> None:
    """fp16 digests that overflowed (+-inf) give infinite and NaN (inf - inf) Quest scores. A
    NaN page score ranks lowest (-inf, never selected) in the kernel and the reference alike;
    the victim ranking stays a total order, so no slot is left unset and every output equals
    the reference's."""
    g = torch.Generator().manual_seed(13)
    b, h_q, h, d, n_p, s = 2, 8, 2, 64, 300, 40
    x = torch.randn(b + 1, n_p, 2, h, d, generator=g)
    dig = torch.stack((x.amin(2), x.amax(2)), dim=2)  # [rows, P, 2, H, D], by logical page
    inf = float("inf")
    dig[:, 10:40, 1, :, 0] = inf  # +inf upper bound: q > 0 gives +inf, q < 0 a finite max
    dig[:, 30:60, 0, :, 1] = -inf  # -inf lower bound
    dig[:, 50:70, :, :, 2] = inf  # lo = hi = inf: q < 0 gives -inf for both
    dig[:, 100:300:7, 0, :, 3] = -inf  # mixed with the +inf of column 3 below: NaN sums
    dig[:, 100:300:7, 1, :, 3] = inf
    inputs = _select_inputs(g, b=b, h_q=h_q, h=h, d=d, n_p=n_p, s=s, p=16, dtype=torch.float16)  # fmt: skip
    # The store by host page: logical page j of row i has host page host_pages[i, j].
    store = torch.empty_like(inputs["digests"])
    store[inputs["host_pages"].flatten()] = dig.flatten(0, 1).to(store.dtype)
    inputs["digests"] = store
    kw = {"page_size": 16, "num_sink_pages": 1, "num_window_pages": 2, "top_k": 32, "layer": 1, "reduction": reduction}  # fmt: skip
    got, want, mine, ref_in = _run_both(inputs, **kw)
    assert bool(torch.isnan(want.raw).any()) and bool(torch.isinf(want.raw).any())
    assert not bool(torch.isnan(got.page_scores).any())
    _assert_equal_selection(got, want, mine, ref_in)


@pytest.mark.parametrize("impl", ["emulated", "reference"])
def test_recall_direct_refuses_a_buffer_list_that_is_not_one_per_layer(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher's contract, checked by the emulated launcher and by the reference alike:
    one K and one V buffer per host layer, all of one shape."""
    if impl == "reference":
        monkeypatch.setenv("FREEKV_OPS", "reference")
    host = torch.zeros(4, 3, 2, 2, 16, 64, dtype=torch.bfloat16)
    work = torch.tensor([[0, 1, 0, 0]], dtype=torch.int32)
    buf = torch.zeros(32, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"host_kv.size\(1\) \(3 layers\) must equal len"):
        ops.recall_direct(host, work, [buf, buf], [buf, buf])
    # The padding the runtime used to pass for the layers below the one it recalls into.
    with pytest.raises(RuntimeError, match=r"k_buffers\[1\] must have shape \[0, 2, 64\]"):
        ops.recall_direct(host, work, [buf[:0], buf, buf], [buf[:0], buf, buf])
    ops.recall_direct(host, work, [buf] * 3, [buf] * 3)


def test_recall_direct_result_does_not_depend_on_its_block_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ctas`` only schedules: any block count (fewer blocks than rows included: each block
    then strides over several rows) copies the same chunks, bit for bit, as the reference."""
    g = torch.Generator().manual_seed(3)
    host = torch.randn(6, 2, 2, 2, 16, 64, generator=g).to(torch.bfloat16)
    # 12 rows, 5 of them padding; distinct (slot, head) targets.
    work = torch.full((12, 4), -1, dtype=torch.int32)
    rows = {0: (0, 0, 0, 0), 2: (5, 1, 1, 16), 4: (2, 0, 1, 32), 5: (2, 1, 0, 80),
            6: (3, 1, 0, 48), 8: (1, 1, 1, 0), 10: (4, 0, 0, 64)}  # fmt: skip
    for i, row in rows.items():
        work[i] = torch.tensor(row)

    def run(ctas: int | None) -> list[torch.Tensor]:
        k = [torch.zeros(96, 2, 64, dtype=torch.bfloat16) for _ in range(2)]
        v = [torch.zeros_like(x) for x in k]
        ops.recall_direct(host, work, k, v, ctas=ctas)
        return k + v

    monkeypatch.setenv("FREEKV_OPS", "reference")
    want = run(None)
    monkeypatch.setenv("FREEKV_OPS", "emulated")
    for ctas in (None, 1, 2, 5, 12, 100):
        got = run(ctas)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), f"ctas={ctas}: buffer {i} differs from the reference"


@pytest.mark.parametrize("impl", ["emulated", "reference"])
def test_recall_direct_refuses_a_block_count_out_of_range(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FREEKV_OPS", impl)
    host = torch.zeros(4, 1, 2, 2, 16, 64, dtype=torch.bfloat16)
    work = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    buf = torch.zeros(32, 2, 64, dtype=torch.bfloat16)
    for bad in (0, -1, 65536):
        with pytest.raises(ValueError, match=r"ctas \(blocks of the recall kernel\) must be in"):
            ops.recall_direct(host, work, [buf], [buf], ctas=bad)
    monkeypatch.setenv("FREEKV_RECALL_CTAS", "many")
    with pytest.raises(ValueError, match=r"FREEKV_RECALL_CTAS must be an integer in \[1, 65535\]"):
        ops.recall_ctas(torch.device("cpu"))
    monkeypatch.setenv("FREEKV_RECALL_CTAS", "3")
    assert ops.recall_ctas(torch.device("cpu")) == 3
    ops.recall_direct(host, work, [buf], [buf])


def test_the_recall_launcher_refuses_a_block_count_out_of_range() -> None:
    """The launcher checks ``ctas`` itself (a caller of the extension without the wrapper)."""
    ext = _load.load_emulated_extension()
    host = torch.zeros(4, 1, 2, 2, 16, 64, dtype=torch.bfloat16)
    work = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    buf = torch.zeros(32, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"ctas \(blocks of the recall kernel\) must be in"):
        ext.recall_direct(host, work, [buf], [buf], 0)


@pytest.mark.parametrize(("dtype", "d"), [("bf16", 96), ("fp16", 80)])
def test_select_at_a_head_dim_without_the_vector_scores(gc: ModuleType, dtype: str, d: int) -> None:
    """Head dims other than 64/128/256 take the score kernel of 4-byte loads: the same checks
    as the grid's (scores, selection up to near-ties, exact delta and work list)."""
    c = gc.Ctx(True)
    for gqa in ((4, 2), (3, 3)):
        gc.check_select(c, gc.DTYPES[dtype], d, 16, f"{dtype} D={d}", gqa)
    failed = [f"{x['op']} [{x['case']}]: {x['detail']}" for x in c.checks if not x["ok"]]
    assert not failed, "\n".join(failed)
    assert len(c.checks) == 2 * len(gc.SELECT_CASES)


def test_select_scores_digests_that_are_not_16_byte_aligned() -> None:
    """A digest store that starts 2 bytes past a 16-byte boundary (a view) is scored by the
    kernel of 4-byte loads; its scores equal the aligned store's within float32 summation
    order, and the selections are the same (scores well apart)."""
    g = torch.Generator().manual_seed(5)
    n, h, d, b, n_p = 12, 2, 128, 2, 10
    lo = torch.randn(n, h, d, generator=g)
    dig = torch.stack((lo, lo + torch.rand(n, h, d, generator=g)), 1).to(torch.bfloat16)
    flat = torch.empty(dig.numel() + 1, dtype=torch.bfloat16)
    flat[1:] = dig.reshape(-1)
    shifted = flat[1:].view(dig.shape)
    assert shifted.data_ptr() % 16 != 0 and dig.data_ptr() % 16 == 0
    q = torch.randn(b, 4, d, generator=g).to(torch.bfloat16)
    rows = torch.tensor([0, 1])
    seq = torch.tensor([16 * n_p, 16 * 8 + 3])
    host_pages = torch.stack([torch.randperm(n, generator=g)[:n_p] for _ in range(2)])
    slot_tokens = torch.arange(2 * 4).view(2, 4) * 16
    kw = {"page_size": 16, "num_sink_pages": 1, "num_window_pages": 1, "top_k": 3, "layer": 0}
    outs = []
    for digests in (dig, shifted):
        s2p = torch.full((2, h, 4), -1, dtype=torch.int64)
        p2s = torch.full((2, h, n_p), -1, dtype=torch.int64)
        outs.append(
            ops.select_pages(q, digests, rows, seq, s2p, p2s, host_pages, slot_tokens, **kw)
        )
    a, b_ = outs
    assert torch.allclose(a.page_scores, b_.page_scores, rtol=1e-4, atol=1e-6)
    assert torch.equal(a.selected, b_.selected)
    s2p = torch.full((2, h, 4), -1, dtype=torch.int64)
    p2s = torch.full((2, h, n_p), -1, dtype=torch.int64)
    want = ops.select_pages_reference(q, dig, rows, seq, s2p, p2s, host_pages, slot_tokens, **kw)
    assert torch.equal(b_.selected, want.selected)  # the 4-byte kernel against the reference


def _step_inputs(b: int = 3, r: int = 5, h_q: int = 4, h: int = 2, d: int = 64, k: int = 2):
    """Valid inputs of ``correction_masks`` and of a speculative ``select_pages`` with its
    commit (CPU, bf16): the select op's arguments and the commit's, by name."""
    bf16, i64 = torch.bfloat16, torch.int64
    q = torch.zeros(b, h_q, d, dtype=bf16)
    regs = torch.arange(b, dtype=i64)
    masks = torch.zeros(3, b, h, dtype=torch.bool)
    n_p, p = 8, 16
    select = dict(
        q=q, digests=torch.zeros(4, 2, h, d, dtype=bf16), rows=regs,
        seq_lens=torch.full((b,), 100, dtype=i64), slot_to_page=torch.full((r, h, k), -1),
        page_to_slot=torch.full((r, h, n_p), -1), host_pages=torch.zeros(r, n_p, dtype=i64),
        slot_tokens=torch.zeros(r, k, dtype=i64),
    )  # fmt: skip
    commit = dict(
        live=None, masks=masks, corr_counts=torch.zeros(b, h, 3, dtype=i64),
        spec_pages=torch.zeros(r, h, k, dtype=i64), spec_len=torch.zeros(r, dtype=i64),
        q_prev=torch.zeros(r, h_q, d, dtype=bf16), counts=torch.zeros(r, ops.NUM_COUNTERS, dtype=i64),
    )  # fmt: skip
    correct = dict(
        q=q, q_prev=torch.zeros(r, h_q, d, dtype=bf16), regs=regs,
        seq_lens=torch.ones(b, dtype=i64), spec_len=torch.zeros(r, dtype=i64), num_kv_heads=h,
        tau=0.5, masks=masks,
    )  # fmt: skip
    geometry = dict(page_size=p, num_sink_pages=1, num_window_pages=1, top_k=k, layer=0)
    return correct, select, commit, geometry


BAD_STEP_INPUTS = [
    ("correct", "regs", lambda t: t.int(), "regs must have dtype"),
    ("correct", "seq_lens", lambda t: t[:2], "seq_lens must have shape"),
    ("correct", "spec_len", lambda t: t[:4], "spec_len must have shape"),
    ("correct", "masks", lambda t: t[:2], "masks must have shape"),
    ("commit", "live", lambda t: torch.ones(3, dtype=torch.int32), "live must have dtype"),
    ("commit", "spec_pages", lambda t: t[..., :1].contiguous(), "spec_pages must have shape"),
    ("commit", "corr_counts", lambda t: t.int(), "corr_counts must have dtype"),
    ("commit", "q_prev", lambda t: t.half(), "q_prev must have dtype"),
    ("commit", "counts", lambda t: t[:, :6].contiguous(), "counts must have shape"),
    ("commit", "masks", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "masks must be contiguous"),
    ("commit", "head_mask", lambda t: torch.ones(3, 2, dtype=torch.bool), "head_mask must be None"),
]  # fmt: skip


@pytest.mark.parametrize("impl", ["emulated", "reference"])
@pytest.mark.parametrize(
    ("op", "arg", "bad", "message"),
    BAD_STEP_INPUTS,
    ids=[f"{o}-{a}" for o, a, _, _ in BAD_STEP_INPUTS],
)
def test_step_ops_refuse_what_the_launchers_refuse(
    impl: str, op: str, arg: str, bad: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrappers refuse, for the reference and the compiled path alike, what the launchers
    refuse (and the launchers themselves, called without the wrapper)."""
    monkeypatch.setenv("FREEKV_OPS", impl)
    correct, select, commit, geo = _step_inputs()

    def run(ext: Any = None) -> None:
        if op == "correct":
            c = correct
            if ext is None:
                ops.correction_masks(**c)
            else:
                ext.correction_masks(c["q"], c["q_prev"], c["regs"], c["seq_lens"],
                                     c["spec_len"], c["num_kv_heads"], c["tau"], True, c["masks"])  # fmt: skip
            return
        spec = ops.SpeculationCommit(**commit)
        if ext is None:
            ops.select_pages(**select, **geo, head_mask=head_mask, commit=spec)
            return
        out = ops.SelectOutputs.allocate(3, 4, 2, 8, 2, 2, "cpu")
        ext.select_pages(*select.values(), head_mask, geo["page_size"], 1, 1, 2, 0, 0, 0.125,
                         out.raw, out.page_scores, out.selected, out.recall, out.counts,
                         out.work, spec.tensors(), spec.live, None, 0, 0)  # fmt: skip

    head_mask = None
    run()  # the valid inputs pass
    if arg == "head_mask":
        head_mask = bad(None)
    elif op == "correct":
        correct[arg] = bad(correct[arg])
    else:
        commit[arg] = bad(commit[arg])
    with pytest.raises(ValueError, match=message):
        run()
    if impl == "emulated":  # the launcher, called without the wrapper
        with pytest.raises(RuntimeError, match=message.split(" must ")[0] + " must"):
            run(_load.load_emulated_extension())


@pytest.mark.parametrize("impl", ["emulated", "reference"])
def test_a_commit_whose_state_has_other_rows_than_the_residency_is_refused(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit's state tensors must have a row per budget region (the residency stores'
    rows): state of 4 rows, consistent among themselves, against 5 regions is refused by the
    wrapper on both paths and by the launcher called directly."""
    monkeypatch.setenv("FREEKV_OPS", impl)
    _, select, commit, geo = _step_inputs()
    for name in ("spec_pages", "spec_len", "q_prev", "counts"):
        commit[name] = commit[name][:4].contiguous()
    spec = ops.SpeculationCommit(**commit)
    with pytest.raises(ValueError, match=r"spec_pages must have shape \[5, 2, 2\]"):
        ops.select_pages(**select, **geo, commit=spec)
    if impl == "emulated":
        ext = _load.load_emulated_extension()
        out = ops.SelectOutputs.allocate(3, 4, 2, 8, 2, 2, "cpu")
        with pytest.raises(RuntimeError, match="spec_pages must have shape"):
            ext.select_pages(*select.values(), None, geo["page_size"], 1, 1, 2, 0, 0, 0.125,
                             out.raw, out.page_scores, out.selected, out.recall, out.counts,
                             out.work, spec.tensors(), spec.live, None, 0, 0)  # fmt: skip


BAD_RERANK = [
    ("codes", lambda r: r._replace(codes=r.codes.to(torch.int8)), "rerank codes must have dtype"),
    ("codes", lambda r: r._replace(codes=r.codes[:, :, :8].contiguous()), "rerank codes must have shape"),
    ("codes", lambda r: r._replace(codes=r.codes.transpose(2, 3).contiguous().transpose(2, 3)), "rerank codes must be contiguous"),
    ("bits", lambda r: r._replace(bits=3), "rerank bits must be"),
    ("bits", lambda r: r._replace(bits=4), "rerank codes must have shape"),  # 2-bit codes
    ("candidates", lambda r: r._replace(candidates=0), r"need 1 <= rerank candidates <= 512, got 0"),
    ("candidates", lambda r: r._replace(candidates=513), r"need 1 <= rerank candidates <= 512, got 513"),
]  # fmt: skip


@pytest.mark.parametrize("impl", ["emulated", "reference"])
@pytest.mark.parametrize(
    ("arg", "bad", "message"),
    BAD_RERANK,
    ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_RERANK)],
)
def test_the_second_stage_refuses_what_its_launcher_refuses(
    impl: str, arg: str, bad: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key codes that do not fit the digests, bits other than 2 or 4, candidates outside
    [1, 512] (the kernel's lists): refused by the wrapper on both paths with the launcher's
    numbers, and by the launcher called directly."""
    monkeypatch.setenv("FREEKV_OPS", impl)
    _, select, _, geo = _step_inputs()
    n, _, h, d = select["digests"].shape
    good = ops.Rerank(torch.zeros(n, h, geo["page_size"], d // 4, dtype=torch.uint8), 2, 4)
    ops.select_pages(**select, **geo, rerank=good)  # the valid stage passes
    rr = bad(good)
    with pytest.raises(ValueError, match=message):
        ops.select_pages(**select, **geo, rerank=rr)
    if impl == "emulated":
        ext = _load.load_emulated_extension()
        out = ops.SelectOutputs.allocate(3, 4, 2, 8, 2, 2, "cpu")
        with pytest.raises(RuntimeError, match=message):
            ext.select_pages(*select.values(), None, geo["page_size"], 1, 1, 2, 0, 0, 0.125,
                             out.raw, out.page_scores, out.selected, out.recall, out.counts,
                             out.work, [], None, rr.codes, rr.bits, rr.candidates)  # fmt: skip


def test_the_commit_kernel_counts_what_the_state_names() -> None:
    """The kernel's counter count (``NUM_COUNTERS``) is the state's (``COUNTER_NAMES``)."""
    from freekv_sglang.state import COUNTER_NAMES

    assert len(COUNTER_NAMES) == ops.NUM_COUNTERS
