"""The real FreeKV server with its ops through the emulated CUDA build (``FREEKV_OPS=emulated``):
every select, recall and prefix load-back of the scheduler runs the CUDA launchers and kernels
on the CPU, with the arguments the GPU path passes.

Two CPU servers with the tiny model in bfloat16 (the kernels take 16-bit K/V; head dim 64, pages
of 16, a 128-token budget): one with the emulated ops, one with the references. Prompts over
the budget must complete on both with the same greedy tokens (recall is bit-exact, and the
selections agree away from near-ties, which these prompts do not hit), with pages recalled,
no request failed and the pools consistent; a resend served from the prefix cache loads its
pages back through the emulated recall. The pair runs twice: with the paper's selection, and
with the selection's second stage (``--freekv-rerank 2``: the key codes written at offload,
the candidates re-ranked inside the select kernel).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(2400)]

pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    ServerHandle,
    freekv_test_args,
    launch_server,
    launch_servers,
)

ARGS = (*freekv_test_args(), "--dtype", "bfloat16")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module", params=["bound", "rerank"])
def servers(request: pytest.FixtureRequest) -> Iterator[dict[str, ServerHandle]]:
    extra = ("--freekv-rerank", "2") if request.param == "rerank" else ()
    managers = {
        ops: launch_server(
            tiny_llama_path(),
            *ARGS,
            *extra,
            max_total_tokens=8192,
            env={"FREEKV_OPS": ops},
            startup_timeout_s=1800,
        )
        for ops in ("emulated", "reference")
    }
    with launch_servers(managers) as handles:
        yield handles


def prompt(seed: int, words: int = 500) -> str:
    return " ".join(WORDS[(seed * 5 + j * (seed + 3)) % len(WORDS)] for j in range(words))


def generate(server: ServerHandle, text: str) -> dict:
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
    r = requests.post(f"{server.base_url}/generate", json=body, timeout=900)
    r.raise_for_status()
    out = dict(r.json())
    assert out["meta_info"]["finish_reason"]["type"] == "length", out["meta_info"]
    return out


def test_emulated_ops_serve_like_the_references(servers: dict[str, ServerHandle]) -> None:
    emu, ref = servers["emulated"], servers["reference"]
    for seed in range(3):
        got, want = generate(emu, prompt(seed)), generate(ref, prompt(seed))
        assert got["output_ids"] == want["output_ids"], seed
    again = generate(emu, prompt(0))  # its prompt pages come back from the prefix cache
    assert again["meta_info"]["cached_tokens"] > 0
    assert again["output_ids"] == generate(ref, prompt(0))["output_ids"]
    state = emu.wait_freekv_idle()
    assert state["pages_recalled"] > 0
    assert state["pools_consistent"] and state["rows"] == 0
    assert state["page_check_failures_total"] == 0 and state["page_checks_total"] > 0
    log = emu.log_tail(200_000)
    assert "freekv: request" not in log, log[-3000:]  # the runtime's line for a failed request
