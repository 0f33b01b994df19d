"""The offload of a decode step's filled pages after the step (a CUDA graph's decode).

Once :meth:`~freekv_sglang.runtime.FreeKVRuntime.defer_offload` was called, a decode step's
``after_kv_write`` writes nothing: the pages it filled are digested and offloaded, for every
layer, when the next forward begins. A prefill's pages are still written in its forward, and a
request released in between drops its waiting pages (their host pages are freed unwritten).
"""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.config import FreeKVConfig
from tests.runtime.small_runtime import LAYERS, MAX_REQUESTS, MAX_SEQ_LEN, D, H, small_runtime

pytestmark = pytest.mark.ops_reference

P = 4
CFG = FreeKVConfig(page_size=P, sink_tokens=4, window_tokens=8, budget_tokens=28)
SLOTS = MAX_REQUESTS * MAX_SEQ_LEN + 1


def test_a_decode_steps_pages_are_offloaded_when_the_next_forward_begins() -> None:
    rt = small_runtime(CFG)
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(SLOTS, H, D, generator=g) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, H, D, generator=g) for _ in range(LAYERS)]
    r2t = (torch.arange(MAX_REQUESTS * MAX_SEQ_LEN) + 1).view(MAX_REQUESTS, -1).to(torch.int32)
    rt.defer_offload(lambda layer: (k[layer], v[layer]), r2t)

    def forward(rows: list[int], lens: list[int], decode: bool) -> None:
        rt.begin_forward(rows, lens, [f"r{r}" for r in rows], decode=decode)
        for layer in range(LAYERS):
            rt.after_kv_write(layer, k[layer], v[layer], r2t)

    forward([0, 1], [10, 7], decode=False)  # prefill: written in its forward
    assert [rt.row(r).offloaded for r in (0, 1)] == [2, 1]
    jobs = rt.offload.jobs_total
    assert jobs == LAYERS
    forward([0, 1], [11, 8], decode=True)  # row 1's second page fills: written later
    assert rt.offload.jobs_total == jobs and rt.row(1).offloaded == 1
    forward([0, 1], [12, 9], decode=True)  # row 0's third page fills; row 1's page written
    assert rt.offload.jobs_total == jobs + LAYERS and rt.row(1).offloaded == 2
    assert rt.row(0).offloaded == 2
    rt.release(0)  # its third page waits: dropped, its host pages freed
    forward([1], [10], decode=True)
    assert rt.offload.jobs_total == jobs + LAYERS
    rt.offload.wait_all()
    written = rt.offload.host_kv[rt.host_index.indices(rt.row(1).host_pages[1:2])]
    want = k[0][r2t[1, P : 2 * P].to(torch.int64)]  # layer 0, head-major host page
    assert torch.equal(written[0, 0, :, 0].transpose(0, 1), want)
    rt.release(1)
    assert rt.check_pools()
    assert rt.host.pool.used_pages == 0
    rt.close()
