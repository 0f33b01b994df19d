"""FreeKV on a GPU through the real SGLang server: the FlashInfer path (``gpu`` marker).

Three servers on the tiny model in bfloat16: dense and FreeKV with CUDA graphs off (the dense
server must run the same decode kernels for outputs to be comparable), and FreeKV under
SGLang's decode graph runner (its default). FreeKV has a 128-token budget and layer 0 dense, so
that ~1K-token prompts exercise every part of
:class:`~freekv_sglang.sglang.flashinfer_backend.FreeKVFlashInferBackend`: eagerly, SGLang's
own decode (no request over budget), one page table of sink, window and budget slots per sparse
request (sparse layer), and the full K/V gathered from slots and the dense-layer store (dense
layer, reclaimed slots); under graphs, the fixed form of every batch size SGLang captures
(FlashInfer's graph wrappers over fixed tables, the dense layer's pool and store parts merged).
The eager FreeKV server also runs the selection's second stage (``--freekv-rerank 2``: key
codes written on the device at offload, the select kernel's re-ranking instantiation); the
graph server runs the paper's selection.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("sglang", reason="the serving path needs sglang installed")

from freekv_sglang.testing.models import tiny_llama_path
from freekv_sglang.testing.server import (
    ServerHandle,
    freekv_test_args,
    launch_server,
    launch_servers,
)
from tests.e2e.test_freekv_server import (
    generate,
    long_prompt,
    short_prompts,
    stats_lines,
)

pytestmark = [pytest.mark.gpu, pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(1800)]

GPU_ARGS = ("--dtype", "bfloat16", "--mem-fraction-static", "0.3")
NO_GRAPHS = ("--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerHandle]]:
    model = tiny_llama_path()

    def start(*extra: str):  # type: ignore[no-untyped-def]
        return launch_server(model, *GPU_ARGS, *extra, max_total_tokens=16384, cpu=False)

    with launch_servers(
        {
            "dense": start(*NO_GRAPHS),
            "freekv": start(
                *freekv_test_args(dense_layers="0"),
                *NO_GRAPHS,
                "--decode-log-interval",
                "8",
                "--freekv-rerank",
                "2",
            ),
            "graphs": start(
                *freekv_test_args(dense_layers="0"),
                "--cuda-graph-max-bs-decode",
                "8",
                "--decode-log-interval",
                "8",
            ),
        }
    ) as handles:
        yield handles


def test_flashinfer_backend_is_chosen_by_default(servers: dict[str, ServerHandle]) -> None:
    log = servers["freekv"].log_path.read_text(errors="replace")
    assert "freekv: budget 128 tokens" in log
    assert "freekv: FlashInfer decode over page tables" in log


def test_within_budget_outputs_equal_dense(servers: dict[str, ServerHandle]) -> None:
    prompts = short_prompts(12)
    want = [generate(servers["dense"], [p], 32)[0]["output_ids"] for p in prompts]
    got = [generate(servers["freekv"], [p], 32)[0]["output_ids"] for p in prompts]
    assert got == want


def test_over_budget_serves_repeatably_with_recalls(servers: dict[str, ServerHandle]) -> None:
    fkv = servers["freekv"]
    mark = fkv.log_mark()
    # Long prompts over budget next to short ones that fit: every plan of a mixed step.
    prompts = [long_prompt(s, 250) for s in range(4)] + short_prompts(3)
    first = generate(fkv, prompts, 48)
    assert all(o["meta_info"]["completion_tokens"] == 48 for o in first)
    assert all(o["meta_info"]["prompt_tokens"] > 512 for o in first[:4])
    again = generate(fkv, prompts, 48)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
    lines = stats_lines(fkv, mark)
    assert lines, "no freekv log line"
    assert max(s["host_used"] for s in lines) >= 4 * 512 // 16
    assert lines[-1]["pages_recalled"] > 0 and lines[-1]["checks"] > 0


def test_under_cuda_graphs_serves_mixed_batches_repeatably(
    servers: dict[str, ServerHandle],
) -> None:
    """Replayed decode steps: requests over budget next to ones within it (one graph per
    padded batch size), every request complete, a second run token for token the first, the
    over-budget requests recalling pages."""
    fkv = servers["graphs"]
    log = fkv.log_path.read_text(errors="replace")
    assert "freekv: decode in fixed form under SGLang's graph runner" in log
    mark = fkv.log_mark()
    prompts = [long_prompt(s, 250) for s in range(4)] + short_prompts(3)
    first = generate(fkv, prompts, 48)
    assert all(o["meta_info"]["completion_tokens"] == 48 for o in first)
    again = generate(fkv, prompts, 48)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
    lines = stats_lines(fkv, mark)
    assert lines and lines[-1]["pages_recalled"] > 0
