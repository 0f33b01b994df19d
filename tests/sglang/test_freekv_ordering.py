"""The ordering hazards of DESIGN.md section 2, each checked on the runtime path that runs here.

The reference implementation has five: (1) the asynchronous selection reads ``q_t`` with no
event after the compute that made it; (2) a step waits on an event that may not have been
recorded yet; (3) layers share staging buffers; (4) page-table metadata is rebuilt on one
stream while the recall stream mutates it; (5) device-wide synchronizes in the decode loop.
:class:`~freekv_sglang.runtime.FreeKVRuntime` orders all of its work on the scheduler
thread and the forward stream, and hands host pages to readers only through conversion
tickets. The tests below make each hazard observable:

- conversions are held back until their ticket is waited on (:class:`HeldConversions`), so a
  read of a host page before its ticket (hazard 2) sees an empty page and changes the output;
- device slots SGLang gets back by reclaim are overwritten before the held conversions run, so
  an offload job that read SGLang's pool instead of its own copy would store garbage (3);
- after every step the budget slots hold exactly the host pages the residency metadata names
  (4), and the speculative selection kept for step t+1 is the one ``q_t`` gives (1);
- ``torch.cuda.synchronize`` and ``torch.cpu.synchronize`` raise while the decode loop runs (5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from freekv_sglang.retrieval import select_pages
from freekv_sglang.state import COUNTER_NAMES

pytest.importorskip("sglang", reason="the reclaiming allocator subclasses SGLang's")

from freekv_sglang.runtime import FreeKVRuntime
from freekv_sglang.sglang.memory import RECLAIMED_SLOT, FreeKVTokenAllocator
from tests.runtime.small_runtime import HQ, LAYERS, D, H, small_runtime, sparse_step

# Tiny shapes (head dim 8, pages of 4) in float32: the ops' references, whatever FREEKV_OPS says.
pytestmark = pytest.mark.ops_reference

P = 4
SLOTS = 600
SCALE = D**-0.5
# Layer 0 dense (reads reclaimed pages from the host pool), layer 1 sparse.
CFG = FreeKVConfig(page_size=P, sink_tokens=4, window_tokens=8, budget_tokens=28, dense_layers=(0,))
ROWS = [0, 2, 3]
PROMPT_LENS = [61, 90, 45]


class HeldConversions:
    """Replaces ``runtime.host.offload_layer``: a job runs only when its ticket is waited on.

    Until then the host pages it would write stay as the pool left them (zero-filled in a
    fresh pool), so reading them early is visible in every result.
    """

    def __init__(self, runtime: FreeKVRuntime) -> None:
        self._submit = runtime.host.offload_layer
        self.held = 0
        self.max_held = 0
        self.step = 0  # set by the test: the decode step now running (0: prefill)
        self.log: list[tuple[int, int, int | None]] = []  # (layer, submitted at, run at)
        runtime.host.offload_layer = self._offload  # type: ignore[method-assign]

    def _offload(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, page_ids: Any, cuda_event: Any = None
    ) -> _HeldTicket:
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        self.log.append((layer, self.step, None))
        return _HeldTicket(self, layer, k, v, list(page_ids), len(self.log) - 1)


class _HeldTicket:
    def __init__(
        self,
        owner: HeldConversions,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        page_ids: list[int],
        entry: int,
    ) -> None:
        self._owner, self._job = owner, (layer, k, v, page_ids)
        self._entry = entry
        self._done = False

    def done(self) -> bool:
        return self._done  # a held job has not even started until someone waits for it

    def wait(self) -> None:
        if not self._done:
            self._done = True
            self._owner.held -= 1
            layer, submitted, _ = self._owner.log[self._entry]
            self._owner.log[self._entry] = (layer, submitted, self._owner.step)
            self._owner._submit(*self._job).wait()


class Sim:
    """What SGLang does around the runtime: its token pool, allocator and request table."""

    def __init__(self, cfg: FreeKVConfig, seed: int, *, attach: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
        self.v = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
        self.rt = small_runtime(cfg)
        self.alloc = FreeKVTokenAllocator(SLOTS, torch.float32, "cpu", None, False)
        self.table = torch.zeros(4, 256, dtype=torch.int32)
        if attach:
            self.rt.attach_allocator(self.alloc, self.table)
        self.rows = torch.tensor(ROWS)
        self.lens = torch.tensor(PROMPT_LENS)
        self.rids = [f"r{r}" for r in ROWS]
        self.freed_by_reclaim: list[int] = []

    def prefill(self) -> None:
        for r, n in zip(ROWS, PROMPT_LENS, strict=True):
            self.table[r, :n] = self.alloc.alloc(n).to(torch.int32)
        self.rt.begin_forward(ROWS, PROMPT_LENS, self.rids)
        for layer in range(LAYERS):
            self.rt.after_kv_write(layer, self.k[layer], self.v[layer], self.table)

    def step(
        self,
        q: torch.Tensor,
        new_kv: list[tuple[torch.Tensor, torch.Tensor]],
        garbage_after_reclaim: bool = False,
    ) -> list[torch.Tensor]:
        """One decode step (this step's K/V written, then every layer); per-layer outputs."""
        self.lens = self.lens + 1
        for r, n in zip(ROWS, self.lens.tolist(), strict=True):
            self.table[r, n - 1] = self.alloc.alloc(1).to(torch.int32)
        before = self.table.clone()
        self.rt.begin_forward(ROWS, self.lens.tolist(), self.rids, decode=True)
        freed = before[(before != self.table) & (self.table == RECLAIMED_SLOT)].to(torch.int64)
        self.freed_by_reclaim.extend(freed.tolist())
        if garbage_after_reclaim and freed.numel():
            # SGLang may hand the freed slots to another request at once.
            for layer in range(LAYERS):
                self.k[layer][freed] = 1e4
                self.v[layer][freed] = -1e4
        outs = []
        for layer in range(LAYERS):
            slots = self.table[self.rows, self.lens - 1].to(torch.int64)
            self.k[layer][slots], self.v[layer][slots] = new_kv[layer]
            self.rt.after_kv_write(layer, self.k[layer], self.v[layer], self.table)
            if CFG.is_dense_layer(layer):
                outs.append(self._dense(layer, q))
            else:
                outs.append(
                    sparse_step(
                        self.rt,
                        layer,
                        q,
                        self.rows,
                        self.lens,
                        self.k[layer],
                        self.v[layer],
                        self.table,
                        SCALE,
                    )
                )
        return outs

    def _dense(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Dense attention over every token, as the backend's dense layers do (full_kv)."""
        out = []
        for i, (r, n) in enumerate(zip(ROWS, self.lens.tolist(), strict=True)):
            if self.rt.has_reclaimed(r):
                k, v = self.rt.full_kv(layer, r, n, self.k[layer], self.v[layer], self.table)
            else:
                tok = self.table[r, :n].to(torch.int64)
                k, v = self.k[layer][tok], self.v[layer][tok]
            qh = q[i].view(H, HQ // H, D)
            logits = torch.einsum("hgd,thd->hgt", qh, k) * SCALE
            out.append(torch.einsum("hgt,thd->hgd", logits.softmax(-1), v).reshape(HQ, D))
        return torch.stack(out)


def step_inputs(seed: int, steps: int) -> list[tuple[torch.Tensor, list]]:
    """Queries (drifting, so some heads are corrected and some are not) and new K/V per step."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(ROWS), HQ, D, generator=g)
    out = []
    for _ in range(steps):
        kv = [
            (torch.randn(len(ROWS), H, D, generator=g), torch.randn(len(ROWS), H, D, generator=g))
            for _ in range(LAYERS)
        ]
        out.append((q, kv))
        q = q + 0.6 * torch.randn(q.shape, generator=g)
    return out


def check_residency(sim: Sim) -> int:
    """Budget slots hold exactly the host pages ``slot_to_page`` names, and ``page_to_slot``
    is its inverse; returns how many (row, head, slot) entries were compared."""
    rt, checked = sim.rt, 0
    host = rt.offload.host_kv
    for layer in range(LAYERS):
        if CFG.is_dense_layer(layer):
            continue
        ls = rt.state.layers[layer]
        for r in ROWS:
            info = rt._rows[r]
            g = info.region
            if g < 0:
                continue
            for h in range(H):
                for s, lp in enumerate(ls.slot_to_page[g, h].tolist()):
                    if lp < 0:
                        continue
                    assert int(ls.page_to_slot[g, h, lp]) == s
                    idx = rt.host.pool.index_of(info.host_pages[lp])
                    lo = int(rt.regions.slot_tokens[g, s])
                    got_k = rt.regions.k_slots[layer][lo : lo + P, h]
                    got_v = rt.regions.v_slots[layer][lo : lo + P, h]
                    torch.testing.assert_close(got_k, host[idx, layer, h, 0], rtol=0, atol=0)
                    torch.testing.assert_close(got_v, host[idx, layer, h, 1], rtol=0, atol=0)
                    checked += 1
                resident = (ls.page_to_slot[g, h] >= 0).nonzero().flatten().tolist()
                assert sorted(resident) == sorted(
                    x for x in ls.slot_to_page[g, h].tolist() if x >= 0
                )
    return checked


@contextmanager
def no_device_synchronize(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("device-wide synchronize inside the decode loop")

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "synchronize", refuse)
        m.setattr(torch.cpu, "synchronize", refuse)
        yield


def release_all(sim: Sim) -> None:
    """Release every request: the pools are consistent and the host pool is empty again."""
    for r in ROWS:
        sim.rt.release(r)
    assert sim.rt.check_pools()
    assert sim.rt.host.pool.used_pages == 0
    sim.rt.close()


def run(sim: Sim, steps: int, garbage: bool = False) -> list[list[torch.Tensor]]:
    sim.prefill()
    return [sim.step(q, kv, garbage) for q, kv in step_inputs(7, steps)]


def test_host_pages_are_read_only_after_their_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hazards 2 and 3: held-back conversions and reused slots change no output."""
    ref = Sim(CFG, 0, attach=True)
    held = Sim(CFG, 0, attach=True)
    hold = HeldConversions(held.rt)
    with no_device_synchronize(monkeypatch):
        want = run(ref, 12)
        got = run(held, 12, garbage=True)
    # The hazard was live: conversions were outstanding while later work was issued, and
    # reclaimed slots were overwritten before their pages' conversions ran.
    assert hold.max_held >= LAYERS
    assert held.freed_by_reclaim
    for step_want, step_got in zip(want, got, strict=True):
        for a, b in zip(step_want, step_got, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert check_residency(held) > 0
    for sim in (ref, held):
        release_all(sim)


def test_residency_metadata_matches_slot_contents_at_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hazard 4: recall data and residency metadata never disagree (they change together)."""
    sim = Sim(CFG, 1, attach=True)
    HeldConversions(sim.rt)
    sim.prefill()
    checked = 0
    with no_device_synchronize(monkeypatch):
        for q, kv in step_inputs(11, 10):
            sim.step(q, kv)
            checked += check_residency(sim)
    assert checked >= 10 * len(ROWS) * H
    sim.rt.close()


def test_speculative_selection_is_made_with_this_steps_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hazard 1: what is kept for step t+1 is exactly the selection of ``q_t`` (not of an
    older or a later query), and with an unchanged query step t+1 attends what the
    synchronous baseline attends."""
    spec = Sim(CFG, 2, attach=True)
    sync = Sim(dataclasses.replace(CFG, selection="current"), 2, attach=True)
    layer = 1
    ls = spec.rt.state.layers[layer]
    rows = spec.rows
    corrections = COUNTER_NAMES.index("corrections")
    with no_device_synchronize(monkeypatch):
        for sim in (spec, sync):
            sim.prefill()
        inputs = step_inputs(13, 6)
        for q, kv in inputs:
            spec.step(q, kv)
            sync.step(q, kv)
            regs = spec.rt.region_index(rows.tolist(), q.device)
            kept = ls.spec_pages[regs]
            store = spec.rt.decode.digests[layer]
            assert store is not None
            digests = store[spec.rt.host_index.table[regs].clamp(min=0)]  # [B, P, 2, H, D]
            want = select_pages(q, digests, spec.lens + 1, CFG, SCALE).pages
            torch.testing.assert_close(kept, want, rtol=0, atol=0)
            assert torch.equal(ls.prev_query[regs], q)
        # One more step with the same query: no head moved, nothing is corrected, and the
        # speculative pages are the ones the current query picks.
        corrected_before = int(ls.counts[regs, corrections].sum())
        q, kv = inputs[-1][0], step_inputs(17, 1)[0][1]
        out_spec = spec.step(q, kv)
        out_sync = sync.step(q, kv)
    assert int(ls.counts[regs, corrections].sum()) == corrected_before
    # The same tokens are attended; the budget slots may hold them in another order, so the
    # sums differ by rounding only.
    torch.testing.assert_close(out_spec[layer], out_sync[layer], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_spec[0], out_sync[0], rtol=0, atol=0)
    for sim in (spec, sync):
        sim.rt.close()


def test_decode_loop_never_synchronizes_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hazard 5, on its own: prefill, decode with reclaim and correction, and release."""
    sim = Sim(CFG, 3, attach=True)
    with no_device_synchronize(monkeypatch):
        run(sim, 8)
        for r in ROWS:
            sim.rt.release(r)
    assert sim.rt.check_pools()
    sim.rt.close()


def test_recall_waits_only_for_the_pages_it_can_select(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page that fills stays in the window for a while, and no selection can choose it
    there: the sparse layer's recalls leave its conversion running (held here) and wait for it
    only at the step its page becomes a candidate. Outputs match unheld conversions exactly."""
    ref = Sim(CFG, 4, attach=True)
    held = Sim(CFG, 4, attach=True)
    hold = HeldConversions(held.rt)
    inputs = step_inputs(19, 12)
    with no_device_synchronize(monkeypatch):
        ref.prefill()
        held.prefill()
        for step, (q, kv) in enumerate(inputs, start=1):
            hold.step = step
            want, got = ref.step(q, kv), held.step(q, kv)
            for a, b in zip(want, got, strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
    sparse = [(sub, ran) for layer, sub, ran in hold.log if layer == 1 and sub > 0]
    assert sparse, "no page filled during decode"
    # Window of 2 pages: the page that fills at length k * P is the window's older page until
    # the length reaches (k + 1) * P, P steps later; at that step the speculative selection
    # (for length (k + 1) * P + 1) may choose it, and its conversion runs then, not before.
    assert all(ran is None or ran == sub + P for sub, ran in sparse), sparse
    assert any(ran is not None for _sub, ran in sparse)
    # Every held job that ran was waited for by the runtime; the newest ones were never.
    ran = sum(1 for _layer, _sub, at in hold.log if at is not None)
    assert held.rt.offload.jobs_total == len(hold.log)
    assert 0 < held.rt.offload.waits_total == ran < len(hold.log)
    for sim in (ref, held):
        release_all(sim)


def test_released_host_pages_wait_for_their_conversions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request released while conversions of its pages are outstanding (held here) keeps
    those pages out of the pool until they ran: freed earlier, a page could go to another
    request and then take the old job's write. Release itself does not wait for them."""
    sim = Sim(CFG, 5, attach=True)
    hold = HeldConversions(sim.rt)
    with no_device_synchronize(monkeypatch):
        run(sim, 6)
    used = sim.rt.host.pool.used_pages
    outstanding = hold.held
    sim.rt.release(ROWS[0])
    parked = int(sim.rt.stats()["host_pages_parked"])
    assert parked > 0
    assert sim.rt.host.pool.used_pages == used
    assert hold.held == outstanding  # nothing was waited for
    # Once no request is live the runtime is idle: it runs the parked pages' jobs, frees them.
    for r in ROWS[1:]:
        sim.rt.release(r)
    assert sim.rt.stats()["host_pages_parked"] == 0
    assert sim.rt.host.pool.used_pages == 0
    assert sim.rt.check_pools()
    sim.rt.close()
    assert hold.held == 0


def test_a_short_host_pool_takes_back_parked_pages() -> None:
    """Parked pages count as free room: a request that finds the pool short waits for the
    parked pages' jobs and gets them, instead of failing."""
    page_bytes = LAYERS * H * 2 * P * D * 4
    rt = small_runtime(CFG, host_pool_bytes=70 * page_bytes)  # one 256-token request + 6
    hold = HeldConversions(rt)
    g = torch.Generator().manual_seed(6)
    k = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS + 1, H, D, generator=g) for _ in range(LAYERS)]
    table = torch.arange(4 * 256, dtype=torch.int32).view(4, 256) % SLOTS + 1

    def prefill(row: int, n: int) -> None:
        rt.begin_forward([row], [n], [f"r{row}"])
        for layer in range(LAYERS):
            rt.after_kv_write(layer, k[layer], v[layer], table)

    prefill(0, 8)  # stays live, so releasing the next one is not idle
    prefill(1, 200)
    rt.release(1)
    assert rt.stats()["host_pages_parked"] == 50
    assert rt.host_headroom(8) == 70 * P - 8  # row 0 holds 8 tokens; parked pages are room
    prefill(2, 100)  # 25 pages; 18 free until the parked 50 come back
    assert rt.stats()["host_pages_parked"] == 0
    assert rt.host.pool.used_pages == 2 + 25
    rt.release(0)
    rt.release(2)
    assert rt.check_pools() and rt.host.pool.used_pages == 0
    rt.close()
    assert hold.held == 0
