"""The adapter's runtime against the core's reference decode step, on a simulated SGLang pool.

The runtime offloads through the real Rust host pool and conversion threads and recalls pages
back from it into budget slots; `freekv_sglang.attention.freekv_attention` attends over padded
K/V with masks. Both must give the same outputs step after step (float32, 1e-5), and releasing
the requests must return every host page. The runtime attends either with its masked torch
attention (the CPU path) or over the page tables the FlashInfer backend plans
(`FreeKVRuntime.attended_table`), run here with the plain-torch reference of FlashInfer's
paged decode (`freekv_sglang.paged_attention`).
"""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.attention import freekv_attention
from freekv_sglang.config import FreeKVConfig
from freekv_sglang.paged_attention import ReferenceDecodeKernels
from freekv_sglang.retrieval import build_digests
from freekv_sglang.runtime import FreeKVRuntime
from freekv_sglang.state import FreeKVState
from tests.runtime.small_runtime import HQ, LAYERS, D, H, engine_kv, small_runtime, sparse_step

# Tiny shapes (head dim 8, pages of 4) in float32: the ops' references, whatever FREEKV_OPS says.
pytestmark = pytest.mark.ops_reference

SLOTS = 1024


def _setup(cfg: FreeKVConfig) -> tuple[FreeKVRuntime, FreeKVState]:
    rt = small_runtime(cfg, slots=SLOTS)
    ref = FreeKVState(
        cfg,
        num_layers=LAYERS,
        num_q_heads=HQ,
        num_kv_heads=H,
        head_dim=D,
        max_requests=4,
        max_seq_len=256,
    )
    return rt, ref


def _paged_step(
    rt: FreeKVRuntime,
    layer: int,
    q: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    req_to_token: torch.Tensor,
) -> torch.Tensor:
    """What both serving backends run per sparse layer, with the reference for the kernel:
    the step's table (sink, window and budget slots, rows of one pool) and one paged decode,
    between correction and speculation."""
    row_list = rows.tolist()
    rt.ensure_regions(row_list)
    table = rt.attended_table(row_list, lens.tolist(), req_to_token)
    attended = ReferenceDecodeKernels().paged()
    attended.plan(table, D**-0.5, 0.0)
    regs = rt.region_index(row_list, q.device)
    pages = rt.decode.correct(layer, q, regs, lens, D**-0.5, row_list)
    # One table for every head holds only if each budget slot holds a selected page.
    assert rt.decode.slots_hold_selection(layer, regs, pages)
    out = attended.run(q, kv)
    rt.decode.speculate(layer, q, regs, lens, D**-0.5, row_list)
    return out


@pytest.mark.parametrize("rerank", [0, 3], ids=["bound", "rerank3"])
@pytest.mark.parametrize("attention", ["torch", "page_tables"])
@pytest.mark.parametrize(
    ("tau", "selection"), [(0.8, "speculative"), (None, "speculative"), (0.8, "current")]
)
def test_runtime_decode_equals_reference_step(
    tau: float | None, selection: str, attention: str, rerank: int
) -> None:
    """The runtime's step against the reference decode step; with ``rerank`` the serving
    selection's second stage (key codes written at offload, re-ranked in the select op)
    against the study's (`attention.rerank_pages` over `attention.quantize_keys`)."""
    g = torch.Generator().manual_seed(0)
    cfg = FreeKVConfig(
        page_size=4,
        sink_tokens=4,
        window_tokens=8,
        budget_tokens=28,
        tau=tau,
        dense_layers=(),
        selection=selection,  # type: ignore[arg-type]
        rerank=rerank,
        rerank_bits=2,
    )
    rt, ref = _setup(cfg)
    k_cache, v_cache = engine_kv(rt, g)
    req_to_token = torch.zeros(4, 256, dtype=torch.int32)
    rows = torch.tensor([1, 3])
    lens = torch.tensor([50, 71])
    perm = torch.randperm(SLOTS - 1, generator=g) + 1
    req_to_token[1, :200] = perm[:200].to(torch.int32)
    req_to_token[3, :200] = perm[200:400].to(torch.int32)
    # Prefill: SGLang wrote the prompt's K/V; the runtime offloads the full pages.
    rt.begin_forward(rows.tolist(), lens.tolist(), ["a", "b"])
    for layer in range(LAYERS):
        rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)

    def padded(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(lens.max())
        idx = req_to_token[rows, :n].to(torch.int64)
        return k_cache[layer][idx], v_cache[layer][idx]

    for layer in range(LAYERS):
        k, _ = padded(layer)
        ref.layers[layer].digests[rows] = build_digests(k, lens, 4, "minmax", ref.max_pages)
    q = torch.randn(2, HQ, D, generator=g)
    for _step in range(12):
        lens = lens + 1
        rt.begin_forward(rows.tolist(), lens.tolist(), ["a", "b"])
        for layer in range(LAYERS):
            slots = req_to_token[rows, lens - 1].to(torch.int64)
            k_cache[layer][slots] = torch.randn(2, H, D, generator=g)
            v_cache[layer][slots] = torch.randn(2, H, D, generator=g)
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)
            kv = (k_cache[layer], v_cache[layer])
            if attention == "page_tables":
                got = _paged_step(rt, layer, q, rows, lens, kv, req_to_token)
            else:
                got = sparse_step(rt, layer, q, rows, lens, *kv, req_to_token, D**-0.5)
            k, v = padded(layer)
            want = freekv_attention(
                q, k, v, lens, ref, layer, rows, D**-0.5, rerank=rerank, rerank_bits=2
            )
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        q = q + 0.6 * torch.randn(q.shape, generator=g)
    got_c = rt.state.counters()
    want_c = ref.counters()
    for name in ("checks", "corrections", "pages_recalled", "resident_hits", "pages_selected"):
        assert got_c[name] == want_c[name], name
    assert got_c["pages_recalled"] > 0
    if selection == "current":
        assert got_c["checks"] == 0  # the synchronous baseline has nothing to correct
    elif tau is not None:
        assert got_c["checks"] > 0
    pool = rt.host.pool
    assert pool.used_pages == (50 + 12) // 4 + (71 + 12) // 4
    rt.release(1)
    rt.release(3)
    assert pool.used_pages == 0
    pool.check_invariants()
    rt.close()


def test_offloaded_pages_hold_the_pool_bytes() -> None:
    cfg = FreeKVConfig(
        page_size=4, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=()
    )
    rt, _ = _setup(cfg)
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = engine_kv(rt, g)
    req_to_token = torch.zeros(4, 256, dtype=torch.int32)
    req_to_token[0, :30] = torch.arange(100, 130, dtype=torch.int32)
    # Chunked prefill: 13 tokens, then 30 in total; pages fill across the chunk boundary.
    for n in (13, 30):
        rt.begin_forward([0], [n], ["r"])
        for layer in range(LAYERS):
            rt.after_kv_write(layer, k_cache[layer], v_cache[layer], req_to_token)
    assert rt.host.pool.used_pages == 30 // 4
    for layer in range(LAYERS):
        ids = rt._rows[0].host_pages
        k, v = rt.host.load_layer(layer, ids, 28)
        torch.testing.assert_close(k, k_cache[layer][100:128], rtol=0, atol=0)
        torch.testing.assert_close(v, v_cache[layer][100:128], rtol=0, atol=0)
    # A new request in the same row (another rid) starts afresh.
    rt.begin_forward([0], [8], ["s"])
    assert rt.host.pool.used_pages == 2
    rt.release(0)
    assert rt.host.pool.used_pages == 0
    rt.close()


def test_attended_table_lists_sink_window_and_budget_slots() -> None:
    """Each request's entries are its sink positions, then its window positions up to its
    length (SGLang's slots), then its whole budget region (rows of the same pool, past SGLang's
    slots)."""
    cfg = FreeKVConfig(
        page_size=4, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=()
    )
    rt, _ = _setup(cfg)
    req_to_token = torch.zeros(4, 256, dtype=torch.int32)
    req_to_token[2, :100] = torch.arange(500, 600, dtype=torch.int32)
    req_to_token[0, :100] = torch.arange(300, 400, dtype=torch.int32)
    rt.begin_forward([2, 0], [41, 29], ["x", "y"])
    with pytest.raises(ValueError, match="ensure_regions"):
        rt.attended_table([2, 0], [41, 29], req_to_token)
    rt.ensure_regions([2, 0])
    with pytest.raises(ValueError, match="fit the budget"):
        rt.attended_table([2], [28], req_to_token)
    t = rt.attended_table([2, 0], [41, 29], req_to_token)
    region = cfg.num_selected_pages * cfg.page_size
    bases = [SLOTS + rt._rows[2].region * region, SLOTS + rt._rows[0].region * region]
    assert sorted(bases) == [SLOTS, SLOTS + region]
    # 41 tokens: 11 pages, window = pages 9-10 = positions 36..40; 29: 8 pages, window 24..28.
    want = [
        *range(500, 504), *range(536, 541), *range(bases[0], bases[0] + region),
        *range(300, 304), *range(324, 329), *range(bases[1], bases[1] + region),
    ]  # fmt: skip
    assert t.kv_indptr.tolist() == [0, 9 + region, 18 + 2 * region]
    assert t.kv_indices[: t.kv_indptr[-1]].tolist() == want
    width = 4 + 8 + region
    assert t.kv_indices.numel() == 2 * width and t.max_kv_len == width
    assert t.kv_last_page_len.tolist() == [1, 1]
    assert t.kv_indptr.device.type == "cpu" and t.kv_last_page_len.device.type == "cpu"
    assert t.kv_indptr.dtype == torch.int32 and t.kv_indices.dtype == torch.int32
    rt.release(2)
    rt.release(0)
    rt.close()


def test_budget_regions_must_fit_the_engine_buffers() -> None:
    """The regions are rows of the engine's KV buffers past ``region_first_slot``: buffers
    without room for them, or of another shape per layer, are refused with the numbers."""
    cfg = FreeKVConfig(page_size=4, sink_tokens=4, window_tokens=8, budget_tokens=28)
    rows = 100 + FreeKVRuntime.region_tokens(cfg, 2)
    kw = dict(
        num_layers=LAYERS, num_q_heads=HQ, num_kv_heads=H, head_dim=D, max_requests=2,
        max_seq_len=64, dtype=torch.float32, device=torch.device("cpu"),
        host_pool_bytes=1 << 20, conversion_threads=1,
    )  # fmt: skip

    def kv(n: int, d: int = D) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [torch.zeros(n, H, d) for _ in range(LAYERS)], [
            torch.zeros(n, H, d) for _ in range(LAYERS)
        ]

    with pytest.raises(
        ValueError, match=rf"from slot 100 need {rows} rows .* which have {rows - 1}"
    ):
        FreeKVRuntime(cfg, **kw, kv_buffers=kv(rows - 1), region_first_slot=100)  # type: ignore[arg-type]
    k, v = kv(rows)
    v[1] = torch.zeros(rows, H, D + 1)
    with pytest.raises(
        ValueError, match=r"v_buffers\[1\] must be \[slots, H, D\] like k_buffers\[0\]"
    ):
        FreeKVRuntime(cfg, **kw, kv_buffers=(k, v), region_first_slot=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"kv_buffers must hold 2 layers of \[slots, 2, 8\]"):
        FreeKVRuntime(cfg, **kw, kv_buffers=kv(rows, D * 2), region_first_slot=100)  # type: ignore[arg-type]
    rt = FreeKVRuntime(cfg, **kw, kv_buffers=kv(rows), region_first_slot=100)  # type: ignore[arg-type]
    assert rt.regions.slot_indices([1]).tolist() == list(range(100 + 16, 100 + 32))
    rt.close()


def test_token_table_lists_the_ranges_slots_in_order() -> None:
    from freekv_sglang.runtime import token_table

    req_to_token = torch.arange(4 * 256, dtype=torch.int32).view(4, 256).flip(1).contiguous()
    t = token_table([3, 1, 0], [[(0, 2), (10, 13)], [(5, 5)], [(250, 256)]], req_to_token)
    want = [req_to_token[3, j] for j in (0, 1, 10, 11, 12)] + [
        req_to_token[0, j] for j in range(250, 256)
    ]
    assert t.kv_indptr.tolist() == [0, 5, 5, 11]
    assert t.kv_indices.tolist() == [int(x) for x in want]
    assert t.kv_last_page_len.tolist() == [1, 1, 1]
    empty = token_table([], [], req_to_token)
    assert empty.kv_indptr.tolist() == [0] and empty.kv_indices.numel() == 0
    with pytest.raises(ValueError, match="reversed"):
        token_table([0], [[(4, 3)]], req_to_token)
