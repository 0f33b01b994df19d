"""Operating a FreeKV server: injected faults and the Prometheus metrics.

Injected offload and recall failures through the real server: an error for the request
that hit them, nothing lost for the others, consistent pools afterwards.

One FreeKV CPU server (tiny model, 128-token budget) runs with
``FREEKV_FAULTS=conversion:7,recall:30``: the 7th offload job and the 30th recall of the
scheduler process fail. The requests hit by them must finish with an error that names the
failure; the server must stay healthy and serve the next requests with the same outputs as
a clean run; ``/server_info`` must show the pools consistent and empty once idle. The server
runs with ``--enable-metrics``: SGLang's ``/metrics`` must carry the ``sglang:freekv_*``
gauges with the figures of the decode log line.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(2400)]

pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    ServerHandle,
    failure_of,
    freekv_test_args,
    launch_server,
)

FREEKV = (
    *freekv_test_args(dense_layers="0"),
    "--enable-metrics",
    "--decode-log-interval",
    "4",
)
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def prompt(seed: int, words: int = 120) -> str:
    return " ".join(WORDS[(seed * 3 + j * (seed + 1)) % len(WORDS)] for j in range(words))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with launch_server(
        tiny_llama_path(),
        *FREEKV,
        max_total_tokens=4096,
        env={"FREEKV_FAULTS": "conversion:7,recall:30"},
        startup_timeout_s=1800,
    ) as handle:
        yield handle


def generate(server: ServerHandle, text: str, n: int = 24) -> requests.Response:
    body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": n}}
    return requests.post(f"{server.base_url}/generate", json=body, timeout=900)


def test_injected_failures_fail_their_requests_only(server: ServerHandle) -> None:
    # Sequential over-budget requests: each offloads 2 layers at prefill (jobs 1-2, 3-4, ...)
    # and recalls every decode step, so the faults land in the first few requests.
    failures = []
    for i in range(6):
        r = generate(server, prompt(i))
        msg = failure_of(r)
        if msg is not None:
            failures.append(msg)
    assert any("offload of layer" in m for m in failures), failures
    assert any("recall into layer" in m for m in failures), failures
    assert len(failures) <= 3, failures
    # The server keeps serving, repeatably.
    a = generate(server, prompt(11))
    b = generate(server, prompt(11))
    assert failure_of(a) is None and failure_of(b) is None
    assert a.json()["text"] == b.json()["text"]
    assert requests.get(f"{server.base_url}/health", timeout=60).status_code == 200
    state = server.wait_freekv_idle()
    assert state["rows"] == 0
    assert state["host_pages_used"] == state["prefix_cache_pages"]
    assert state["pools_consistent"] is True


def test_prometheus_metrics_carry_the_freekv_figures(server: ServerHandle) -> None:
    r = generate(server, prompt(21), n=16)
    assert failure_of(r) is None
    text = requests.get(f"{server.base_url}/metrics", timeout=60).text
    values = {}
    for line in text.splitlines():
        if line.startswith("sglang:freekv_"):
            name, _, value = line.partition(" ")
            values[name.split("{")[0]] = float(value.split()[0])
    for name in ("correction_rate", "pages_recalled", "host_pages_used", "host_pool_usage"):
        assert f"sglang:freekv_{name}" in values, sorted(values)
    assert values["sglang:freekv_pages_recalled"] > 0
    assert 0.0 <= values["sglang:freekv_correction_rate"] <= 1.0
