"""Shared prefixes in the runtime: a finished request publishes its pages, a later request that
starts with them adopts them (no second offload), and decodes exactly as if it had computed
and offloaded them itself."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.integrity import PageChecksumError
from freekv_sglang.runtime import FreeKVRuntime
from freekv_sglang.runtime import prefix as prefix_mod
from tests.runtime.small_runtime import HQ, LAYERS, D, H, small_runtime, sparse_step

# The references unless a case sets FREEKV_OPS itself (its cpu-emulated case).
pytestmark = pytest.mark.ops_reference

P = 4
CFG = FreeKVConfig(page_size=P, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=())
SLOTS = 400
NS = ("adapter", None)


def write(k_cache: list, v_cache: list, slots: torch.Tensor, g: torch.Generator) -> None:
    for layer in range(LAYERS):
        k_cache[layer][slots] = torch.randn(len(slots), H, D, generator=g)
        v_cache[layer][slots] = torch.randn(len(slots), H, D, generator=g)


def prefill(rt: FreeKVRuntime, row: int, rid: str, length: int, k, v, table) -> None:
    rt.begin_forward([row], [length], [rid])
    for layer in range(LAYERS):
        rt.after_kv_write(layer, k[layer], v[layer], table)


def decode(rt: FreeKVRuntime, row: int, length: int, q, k, v, table) -> list[torch.Tensor]:
    rt.begin_forward([row], [length], None, decode=True)
    rows, lens = torch.tensor([row]), torch.tensor([length])
    outs = []
    for layer in range(LAYERS):
        rt.after_kv_write(layer, k[layer], v[layer], table)
        outs.append(sparse_step(rt, layer, q, rows, lens, k[layer], v[layer], table, D**-0.5))
    return outs


def test_adopted_prefix_decodes_like_a_computed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Load-back stages 3 pages at a time here: chunks of 3, 3, 3 and 1 of the 10 shared pages.
    monkeypatch.setattr(prefix_mod, "LOAD_CHUNK_TOKENS", 3 * P)
    g = torch.Generator().manual_seed(0)
    k = [torch.zeros(SLOTS, H, D) for _ in range(LAYERS)]
    v = [torch.zeros(SLOTS, H, D) for _ in range(LAYERS)]
    table = torch.zeros(4, 256, dtype=torch.int32)
    shared = small_runtime(CFG)
    tree = shared.prefix.enable()
    # Request A (row 0): 61 tokens, 15 full pages, published when it finishes.
    tokens_a = list(range(1000, 1061))
    table[0, :61] = torch.arange(1, 62, dtype=torch.int32)
    write(k, v, table[0, :61].long(), g)
    prefill(shared, 0, "a", 61, k, v, table)
    assert shared.publish_prefix(0, tokens_a, NS) == 15
    shared.release(0)
    assert shared.host.pool.used_pages == tree.num_pages == 15
    assert shared.check_pools()

    # Request B (row 1) starts with A's first 40 tokens (10 pages) and has 30 of its own.
    tokens_b = tokens_a[:40] + list(range(5000, 5030))
    hit = tree.match(NS, tokens_b[:69])
    assert len(hit) == 10
    pages = [n.page_id for n in hit]
    # Load-back: the shared K/V onto new device slots (scattered, as SGLang's allocator may
    # hand them out), as the prefix cache does.
    table[1, :70] = torch.arange(100, 170, dtype=torch.int32)
    table[1, :40] = table[1, :40].flip(0)
    shared.prefix.load(pages, table[1, :40].long(), lambda layer: (k[layer], v[layer]))
    for layer in range(LAYERS):
        for cache in (k, v):
            want = cache[layer][table[0, :40].long()]
            torch.testing.assert_close(cache[layer][table[1, :40].long()], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="10 pages need 40 slots, got 39"):
        shared.prefix.load(pages, table[1, :39].long(), lambda layer: (k[layer], v[layer]))
    write(k, v, table[1, 40:70].long(), g)
    shared.prefix.offer("b", pages)
    assert [shared.host.pool.refcount(p) for p in pages] == [2] * 10
    prefill(shared, 1, "b", 70, k, v, table)
    # Only B's own 7 full pages were allocated and offloaded.
    assert shared.host.pool.used_pages == 15 + 7
    assert shared.stats()["prefix_pages_adopted_total"] == 10

    # Reference: B computed and offloaded alone by a runtime without the cache.
    alone = small_runtime(CFG)
    prefill(alone, 1, "b", 70, k, v, table)
    # The shared pages' digests were written once, when A offloaded them; B's own pages' when
    # B did: the same digests as B's alone, page for page.
    ids_shared = shared.host.pool.indices_of(shared._rows[1].host_pages[:17])
    ids_alone = alone.host.pool.indices_of(alone._rows[1].host_pages[:17])
    for layer in range(LAYERS):
        a, b = shared.decode.digests[layer], alone.decode.digests[layer]
        assert a is not None and b is not None
        torch.testing.assert_close(a[ids_shared], b[ids_alone], rtol=0, atol=0)
    q = torch.randn(1, HQ, D, generator=g)
    length = 70
    for _ in range(6):
        length += 1
        table[1, length - 1] = 170 + length
        write(k, v, table[1, length - 1 : length].long(), g)
        got = decode(shared, 1, length, q, k, v, table)
        want = decode(alone, 1, length, q, k, v, table)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        q = q + 0.5 * torch.randn(q.shape, generator=g)

    shared.release(1)
    assert [shared.host.pool.refcount(p) for p in pages] == [1] * 10
    assert shared.host.pool.used_pages == 15
    # An offer no row adopted (the request left before its prefill) is given back.
    shared.prefix.offer("c", pages[:3])
    shared.prefix.drop_offer("c")
    assert shared.host.pool.used_pages == 15 and shared.check_pools()
    tree.clear()
    assert shared.host.pool.used_pages == 0
    for rt in (shared, alone):
        rt.close()


def test_a_short_host_pool_evicts_cached_pages_for_a_new_request() -> None:
    g = torch.Generator().manual_seed(1)
    page_bytes = 2 * LAYERS * H * P * D * 4
    rt = small_runtime(CFG, host_pool_bytes=70 * page_bytes)  # 70 pages; one request needs 64
    tree = rt.prefix.enable()
    k = [torch.zeros(SLOTS, H, D) for _ in range(LAYERS)]
    v = [torch.zeros(SLOTS, H, D) for _ in range(LAYERS)]
    table = torch.zeros(4, 256, dtype=torch.int32)
    table[0, :200] = torch.arange(1, 201, dtype=torch.int32)
    write(k, v, table[0, :200].long(), g)
    prefill(rt, 0, "a", 200, k, v, table)
    assert rt.publish_prefix(0, list(range(200)), NS) == 50
    rt.release(0)
    assert rt.host.pool.used_pages == 50
    # A request of 120 tokens (30 pages) needs more than the 20 free pages: the least
    # recently used cached pages no request holds make room.
    table[1, :120] = torch.arange(1, 121, dtype=torch.int32)
    prefill(rt, 1, "b", 120, k, v, table)
    assert len(rt._rows[1].host_pages) == 30
    assert tree.evicted_pages_total >= 10
    assert rt.check_pools()
    rt.release(1)
    tree.clear()
    assert rt.host.pool.used_pages == 0
    rt.close()


@pytest.mark.parametrize("failed", [False, True])
def test_publish_skips_failed_requests(failed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if failed:
        monkeypatch.setenv("FREEKV_FAULTS", "conversion:1")
    rt = small_runtime(CFG)
    rt.prefix.enable()
    k = [torch.randn(SLOTS, H, D) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, H, D) for _ in range(LAYERS)]
    table = torch.zeros(4, 256, dtype=torch.int32)
    table[0, :40] = torch.arange(1, 41, dtype=torch.int32)
    prefill(rt, 0, "a", 40, k, v, table)
    assert rt.publish_prefix(0, list(range(40)), NS) == (0 if failed else 10)
    rt.release(0)
    assert rt.check_pools()
    rt.close()


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        pytest.param("cpu", torch.float32, id="cpu"),
        pytest.param("emulated", torch.bfloat16, id="cpu-emulated", marks=pytest.mark.slow),
        pytest.param("cuda", torch.bfloat16, id="cuda", marks=pytest.mark.gpu),
    ],
)
def test_published_pages_load_back_bit_exact(
    device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offload (on a GPU: the staged copy on the offload stream and the event-gated
    conversion), publish, and load back into other slots through the recall op: every layer's
    K and V arrive unchanged, over several staging chunks. ``cpu-emulated``: the recall op is
    the CUDA launcher and kernel run on the CPU (``FREEKV_OPS=emulated``)."""
    if device == "emulated":
        monkeypatch.setenv("FREEKV_OPS", "emulated")
        device = "cpu"
    # The page checks run on what the recall op (here the kernel, emulated or not) brought back.
    monkeypatch.setenv("FREEKV_VERIFY_PAGES", "1")
    g = torch.Generator().manual_seed(5)
    d, p, n = 128, 16, 150  # 9 full pages
    cfg = FreeKVConfig(page_size=p, sink_tokens=16, window_tokens=32, budget_tokens=112)
    size = 2 * 256 + 1
    rows = size + FreeKVRuntime.region_tokens(cfg, 2)
    k = [torch.randn(rows, 2, d, generator=g).to(device, dtype) for _ in range(3)]
    v = [torch.randn(rows, 2, d, generator=g).to(device, dtype) for _ in range(3)]
    rt = FreeKVRuntime(
        cfg, num_layers=3, num_q_heads=8, num_kv_heads=2, head_dim=d, max_requests=2,
        max_seq_len=256, dtype=dtype, device=torch.device(device), host_pool_bytes=8 << 20,
        conversion_threads=2, kv_buffers=(k, v), region_first_slot=size,
    )  # fmt: skip
    rt.prefix.enable()
    table = torch.zeros(2, 256, dtype=torch.int32, device=device)
    table[0, :n] = torch.randperm(256, generator=g)[:n].to(device, torch.int32) + 1
    rt.begin_forward([0], [n], ["a"])
    for layer in range(3):
        rt.after_kv_write(layer, k[layer], v[layer], table)
    assert rt.publish_prefix(0, list(range(n)), NS) == n // p
    pages = [node.page_id for node in rt.prefix.tree.match(NS, list(range(n)))]
    rt.release(0)
    dst = (257 + torch.randperm(255, generator=g)[: len(pages) * p]).to(device)
    monkeypatch.setattr(prefix_mod, "LOAD_CHUNK_TOKENS", 4 * p)  # chunks of 4, 4, 1 pages
    rt.prefix.load(pages, dst, lambda layer: (k[layer], v[layer]))
    src = table[0, : len(pages) * p].to(torch.int64)
    for layer in range(3):
        assert torch.equal(k[layer][dst], k[layer][src])
        assert torch.equal(v[layer][dst], v[layer][src])
    assert (
        rt.stats()["page_checks_total"] == len(pages) * 3
        and rt.stats()["page_check_failures_total"] == 0
    )
    rt.prefix.tree.clear()
    assert rt.check_pools() and rt.host.pool.used_pages == 0
    rt.close()


def _prefilled_40(seed: int) -> tuple[FreeKVRuntime, list, list, torch.Tensor]:
    """A runtime with the prefix tree on and request "a" (row 0) prefilled with 40 tokens."""
    rt = small_runtime(CFG)
    rt.prefix.enable()
    g = torch.Generator().manual_seed(seed)
    k = [torch.zeros(SLOTS, H, D) for _ in range(LAYERS)]
    v = [torch.zeros(SLOTS, H, D) for _ in range(LAYERS)]
    table = torch.zeros(4, 256, dtype=torch.int32)
    table[0, :40] = torch.arange(1, 41, dtype=torch.int32)
    write(k, v, table[0, :40].long(), g)
    prefill(rt, 0, "a", 40, k, v, table)
    return rt, k, v, table


def test_a_reported_failure_still_blocks_publishing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler hook aborts a failed request and clears its report (``clear_failure``)
    before SGLang releases it, which publishes first: the row must stay refused."""
    monkeypatch.setenv("FREEKV_FAULTS", "conversion:2")  # the row's layer-1 job
    rt, k, v, table = _prefilled_40(seed=3)
    rt.offload.wait_all()  # the job's failure is collected: reported for "a"
    assert list(rt.failures()) == ["a"]
    rt.clear_failure("a")  # what the abort hook does
    assert rt.failures() == {}
    assert rt.publish_prefix(0, list(range(40)), NS) == 0
    rt.release(0)
    assert rt.prefix.tree is not None and rt.prefix.tree.num_pages == 0
    assert rt.check_pools() and rt.host.pool.used_pages == 0
    # The row's next owner starts clean: it publishes.
    prefill(rt, 0, "b", 40, k, v, table)
    assert rt.publish_prefix(0, list(range(40)), NS) == 10
    rt.release(0)
    rt.prefix.tree.clear()
    rt.close()


@pytest.mark.parametrize("corrupt", [None, "k", "v", "swap"])
def test_page_checks_catch_a_page_that_differs_from_its_offload(
    corrupt: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debug mode (FREEKV_VERIFY_PAGES=1): a published page is checked against the checksum
    taken at offload when it is loaded back. An intact page passes; a changed value in K or V,
    or two tokens of a page swapped, is refused with the page and layer named."""
    monkeypatch.setenv("FREEKV_VERIFY_PAGES", "1")
    rt, k, v, _table = _prefilled_40(seed=4)
    assert rt.publish_prefix(0, list(range(40)), NS) == 10
    rt.release(0)
    pages = [node.page_id for node in rt.prefix.tree.match(NS, list(range(40)))]
    victim = rt.host.pool.index_of(pages[7])
    page = rt.offload.host_kv[victim, 1]  # layer 1: [H, K/V, page, D]
    if corrupt == "k":
        page[1, 0, 2, 5] += 1.0
    elif corrupt == "v":
        page[0, 1, 3, 0] = -page[0, 1, 3, 0] - 1.0
    elif corrupt == "swap":
        page[0, 0, [0, 1]] = page[0, 0, [1, 0]].clone()
    dst = torch.arange(200, 240)
    if corrupt is None:
        rt.prefix.load(pages, dst, lambda layer: (k[layer], v[layer]))
        assert (
            rt.stats()["page_checks_total"] == 10 * LAYERS
            and rt.stats()["page_check_failures_total"] == 0
        )
    else:
        with pytest.raises(PageChecksumError, match=rf"host page {pages[7]} \(layer 1\)"):
            rt.prefix.load(pages, dst, lambda layer: (k[layer], v[layer]))
        assert rt.stats()["page_check_failures_total"] == 1
    assert rt.stats()["page_checks_on"] is True
    rt.prefix.tree.clear()
    rt.close()


def test_page_checks_are_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FREEKV_VERIFY_PAGES", raising=False)
    rt = small_runtime(CFG)
    assert rt.stats()["page_checks_on"] is False
    rt.close()
    monkeypatch.setenv("FREEKV_VERIFY_PAGES", "yes")
    with pytest.raises(ValueError, match="FREEKV_VERIFY_PAGES='yes': expected 0 or 1"):
        small_runtime(CFG)
