"""Conversion workers from Python: NHD <-> HND against a pure-torch reference, argument
checks raising LayoutMismatchError, failures reaching the waiter, shutdown."""

from __future__ import annotations

import threading

import pytest
import torch

from freekv_sglang import _native as nat


def reference_hnd(k: torch.Tensor, page_size: int) -> torch.Tensor:
    """NHD ``[tokens, H, D]`` -> per-page HND ``[pages, H, page_size, D]`` (zero padded)."""
    tokens, heads, dim = k.shape
    pages = -(-tokens // page_size)
    padded = torch.zeros(pages * page_size, heads, dim, dtype=k.dtype)
    padded[:tokens] = k
    return padded.view(pages, page_size, heads, dim).permute(0, 2, 1, 3)


def random_kv(tokens: int, heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(tokens, heads, dim, dtype=torch.float32)
    return x.to(dtype)


@pytest.mark.parametrize("page_size", [1, 16, 32, 64])
@pytest.mark.parametrize(
    ("heads", "dtype"),
    [(1, "bfloat16"), (3, "float16"), (5, "float32"), (8, "float8_e4m3fn")],
)
def test_nhd_to_hnd_matches_reference_and_round_trips(
    page_size: int, heads: int, dtype: str
) -> None:
    dim, layers = 64, 3
    g = nat.PageGeometry(layers, heads, page_size, dim, dtype)
    tokens = 2 * page_size + (page_size + 1) // 2  # last page partly filled when page_size > 1
    pages = -(-tokens // page_size)
    pool = nat.HostPagePool(g, (pages + 2) * g.page_bytes)
    tdtype = getattr(torch, dtype)
    with nat.ConversionWorkers(pool, num_threads=2, queue_depth=8) as workers:
        pool.alloc(1)  # so the job's slots are not simply 0..pages-1
        ids = pool.alloc(pages)[::-1]
        k, v = random_kv(tokens, heads, dim, tdtype), random_kv(tokens, heads, dim, tdtype)
        workers.submit_nhd_to_hnd(1, k, v, ids).wait()

        arena = pool.arena_view()
        slots = [pool.index_of(i) for i in ids]
        got_k = arena[slots, 1, :, 0].view(torch.uint8)
        got_v = arena[slots, 1, :, 1].view(torch.uint8)
        rows = tokens - (pages - 1) * page_size
        want_k = reference_hnd(k, page_size).contiguous().view(torch.uint8)
        want_v = reference_hnd(v, page_size).contiguous().view(torch.uint8)
        # Full pages exactly; of the last page, only the rows that were written.
        assert torch.equal(got_k[:-1], want_k[:-1])
        assert torch.equal(got_v[:-1], want_v[:-1])
        assert torch.equal(got_k[-1][:, :rows], want_k[-1][:, :rows])
        assert torch.equal(got_v[-1][:, :rows], want_v[-1][:, :rows])
        # Other layers untouched.
        assert bool((arena[slots][:, [0, 2]].view(torch.uint8) == 0).all())

        k2, v2 = torch.empty_like(k), torch.empty_like(v)
        workers.submit_hnd_to_nhd(1, ids, k2, v2).wait()
        assert torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
        assert torch.equal(v2.view(torch.uint8), v.view(torch.uint8))
    assert workers.is_shut_down
    assert all(pool.refcount(i) == 1 for i in ids)  # jobs released their references
    pool.check_invariants()


def make(
    page_size: int = 4, heads: int = 2, dim: int = 8, pages: int = 4
) -> tuple[nat.HostPagePool, nat.ConversionWorkers]:
    g = nat.PageGeometry(2, heads, page_size, dim, "bfloat16")
    pool = nat.HostPagePool(g, pages * g.page_bytes)
    return pool, nat.ConversionWorkers(pool, num_threads=2, queue_depth=16)


def test_bad_tensors_raise_layout_mismatch() -> None:
    pool, workers = make()
    ids = pool.alloc(2)
    good = torch.zeros(8, 2, 8, dtype=torch.bfloat16)
    bad = {
        "dtype": good.to(torch.float16),
        "shape": torch.zeros(8, 3, 8, dtype=torch.bfloat16),
        "rank": torch.zeros(8, 16, dtype=torch.bfloat16),
        "strided": torch.zeros(8, 8, 2, dtype=torch.bfloat16).transpose(1, 2),
        "device": torch.zeros(8, 2, 8, dtype=torch.bfloat16, device="meta"),
        "not a tensor": [[0.0]],
        "too many tokens": torch.zeros(9, 2, 8, dtype=torch.bfloat16),
        "too few tokens": torch.zeros(4, 2, 8, dtype=torch.bfloat16),
    }
    for name, t in bad.items():
        with pytest.raises(nat.LayoutMismatchError):
            workers.submit_nhd_to_hnd(0, good, t, ids)
            pytest.fail(f"accepted {name}")
    with pytest.raises(nat.LayoutMismatchError):
        workers.submit_nhd_to_hnd(2, good, good.clone(), ids)  # layer out of range
    with pytest.raises(nat.LayoutMismatchError):
        workers.submit_hnd_to_nhd(0, ids, good, good)  # outputs alias each other
    assert all(pool.refcount(i) == 1 for i in ids)  # rejected jobs hold no reference
    workers.shutdown()


def test_stale_ids_are_rejected_at_submit() -> None:
    pool, workers = make()
    ids = pool.alloc(2)
    pool.release([ids[1]])
    k = torch.zeros(8, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(nat.StaleHandleError):
        workers.submit_nhd_to_hnd(0, k, k.clone(), ids)
    assert pool.refcount(ids[0]) == 1
    workers.shutdown()


def test_injected_failure_reaches_the_waiter() -> None:
    pool, workers = make()
    ids = pool.alloc(2)
    k = torch.ones(8, 2, 8, dtype=torch.bfloat16)
    workers.inject_failure(2)
    tickets = [workers.submit_nhd_to_hnd(0, k, k.clone(), ids) for _ in range(2)]
    for t in tickets:
        with pytest.raises(nat.JobFailedError, match="injected"):
            t.wait()
        assert t.done()
    with pytest.raises(nat.JobFailedError):
        nat.wait_all(tickets)
    ok = workers.submit_nhd_to_hnd(0, k, k.clone(), ids)
    workers.wait_all([ok])
    assert bool((pool.page_view(ids[0])[0, :, 0] == 1).all())
    workers.shutdown()
    pool.check_invariants()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure path")
def test_cuda_event_without_a_device_is_a_cuda_error() -> None:
    pool, workers = make()
    ids = pool.alloc(1)
    k = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    t = workers.submit_nhd_to_hnd(0, k, k.clone(), ids, cuda_event=16)
    with pytest.raises(nat.CudaError):
        t.wait()
    with pytest.raises(nat.LayoutMismatchError):
        workers.submit_nhd_to_hnd(0, k, k.clone(), ids, cuda_event=0)
    workers.shutdown()


def test_jobs_keep_their_tensors_alive() -> None:
    pool, workers = make(page_size=64, heads=8, dim=128, pages=64)
    ids = pool.alloc(64)
    tickets, expected = [], []
    for layer in range(2):
        k = torch.randn(64 * 64, 8, 128).to(torch.bfloat16)
        expected.append(k.clone())
        tickets.append(workers.submit_nhd_to_hnd(layer, k, k, ids))
        del k  # only the job holds it now
    workers.wait_all(tickets)
    for layer in range(2):
        out, out_v = torch.empty_like(expected[layer]), torch.empty_like(expected[layer])
        workers.submit_hnd_to_nhd(layer, ids, out, out_v).wait()
        assert torch.equal(out, expected[layer]) and torch.equal(out_v, expected[layer])
    workers.shutdown()


@pytest.mark.parametrize("cancel", [True, False])
def test_shutdown_with_jobs_in_flight(cancel: bool) -> None:
    g = nat.PageGeometry(8, 8, 64, 128, "bfloat16")
    pool = nat.HostPagePool(g, 16 * g.page_bytes)
    ids = pool.alloc(16)
    workers = nat.ConversionWorkers(pool, num_threads=1, queue_depth=256)
    k = torch.ones(4 * 64, 8, 128, dtype=torch.bfloat16)
    # 200 jobs of 1 MiB each: a single worker needs far longer than submitting them takes.
    n = 200
    tickets = [
        workers.submit_nhd_to_hnd(i % 8, k, k, ids[(i % 4) * 4 : (i % 4) * 4 + 4]) for i in range(n)
    ]
    workers.shutdown(cancel_pending=cancel)
    outcomes = []
    for t in tickets:
        assert t.done()
        try:
            t.wait()
            outcomes.append("ok")
        except nat.WorkerShutdownError:
            outcomes.append("cancelled")
    if cancel:
        # FIFO: some prefix ran, the rest was cancelled.
        done = outcomes.count("ok")
        assert done < n
        assert outcomes == ["ok"] * done + ["cancelled"] * (n - done)
    else:
        assert outcomes == ["ok"] * n
    with pytest.raises(nat.WorkerShutdownError):
        workers.submit_nhd_to_hnd(0, k, k, ids[:4])
    workers.shutdown()  # idempotent
    assert all(pool.refcount(i) == 1 for i in ids)
    pool.check_invariants()


def test_context_manager_cancels_on_exception() -> None:
    _pool, workers = make()
    with pytest.raises(KeyError), workers:
        raise KeyError("boom")
    assert workers.is_shut_down


def test_many_python_threads_submit_and_wait() -> None:
    pool, workers = make(page_size=16, heads=4, dim=64, pages=64)
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(10):
                ids = pool.alloc(2)
                k = torch.randn(32, 4, 64, generator=gen).to(torch.bfloat16)
                v = torch.randn(32, 4, 64, generator=gen).to(torch.bfloat16)
                workers.submit_nhd_to_hnd(seed % 2, k, v, ids).wait()
                k2, v2 = torch.empty_like(k), torch.empty_like(v)
                workers.submit_hnd_to_nhd(seed % 2, ids, k2, v2).wait()
                assert torch.equal(k2, k) and torch.equal(v2, v)
                pool.release(ids)
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.used_pages == 0
    pool.check_invariants()
    workers.shutdown()
