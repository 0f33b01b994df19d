"""Admission under FreeKV: with the same device KV pool, more long requests run at once.

Two CPU servers with the tiny model and the same small device pool (``--max-total-tokens
2048``): SGLang with ``--kv-offload none`` and with FreeKV at a 128-token budget (layer 0
dense, so its decode reads reclaimed pages from the host pool; chunked prefill of 256 tokens).
Eight ~700-token requests arrive at once. Dense SGLang can hold only two of them; FreeKV keeps
each running request's sink and window on the device, gives the other slots back, and SGLang's
own admission runs more of them side by side. Concurrency is read from SGLang's own decode log
line (``#running-req``), the FreeKV figures from ``/server_info``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(2400)]

pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    ServerHandle,
    freekv_test_args,
    launch_server,
    launch_servers,
)

POOL_TOKENS = 2048
NEW_TOKENS = 64
COMMON = ("--decode-log-interval", "1", "--chunked-prefill-size", "256")
FREEKV = freekv_test_args(dense_layers="0")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def prompt(seed: int, words: int = 170) -> str:
    return " ".join(WORDS[(seed * 5 + j * (seed + 2)) % len(WORDS)] for j in range(words))


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerHandle]]:
    managers = {
        "dense": launch_server(
            tiny_llama_path(),
            "--kv-offload",
            "none",
            *COMMON,
            max_total_tokens=POOL_TOKENS,
            startup_timeout_s=1800,
        ),
        "freekv": launch_server(
            tiny_llama_path(),
            *FREEKV,
            *COMMON,
            max_total_tokens=POOL_TOKENS,
            startup_timeout_s=1800,
        ),
    }
    with launch_servers(managers) as handles:
        yield handles


def run_burst(server: ServerHandle, n: int) -> list[dict]:
    """``n`` concurrent requests; returns their JSON results in order."""
    out: list[dict | None] = [None] * n

    def one(i: int) -> None:
        body = {
            "text": prompt(i),
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": NEW_TOKENS,
                "ignore_eos": True,
            },
        }
        r = requests.post(f"{server.base_url}/generate", json=body, timeout=1500)
        r.raise_for_status()
        out[i] = r.json()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def peak_running(server: ServerHandle) -> int:
    """Largest ``#running-req`` of SGLang's decode log lines so far."""
    text = server.log_path.read_text(errors="replace")
    counts = [int(m) for m in re.findall(r"Decode batch[^\n]*?#running-req: (\d+)", text)]
    assert counts, "no decode log line"
    return max(counts)


def freekv_state(server: ServerHandle) -> dict:
    info = requests.get(f"{server.base_url}/server_info", timeout=60).json()
    return dict(info["internal_states"][0]["freekv"])


def test_freekv_runs_more_long_requests_at_once(servers: dict[str, ServerHandle]) -> None:
    results = {name: run_burst(server, 8) for name, server in servers.items()}
    for outs in results.values():
        for o in outs:
            assert o["meta_info"]["completion_tokens"] == NEW_TOKENS
    need = max(o["meta_info"]["prompt_tokens"] for o in results["dense"]) + NEW_TOKENS
    assert need > 600
    dense_peak = peak_running(servers["dense"])
    freekv_peak = peak_running(servers["freekv"])
    # Dense: every running request holds its whole context on the device.
    assert dense_peak <= POOL_TOKENS // need
    # FreeKV: the same device pool runs at least twice as many.
    assert freekv_peak >= 2 * dense_peak, (dense_peak, freekv_peak)
    state = freekv_state(servers["freekv"])
    assert state["rows_peak"] >= freekv_peak
    assert state["device_tokens_reclaimed_total"] > 0
    # Idle again: nothing held on the host, no reclaimed position left, no device slot in use.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = freekv_state(servers["freekv"])
        if state["rows"] == 0:
            break
        time.sleep(1.0)
    assert state["rows"] == 0
    assert state["host_pages_used"] == 0
    assert state["device_tokens_reclaimed"] == 0
    assert state["device_tokens_in_use"] == 0


def test_device_slots_per_request_stay_at_the_budget(servers: dict[str, ServerHandle]) -> None:
    server = servers["freekv"]
    samples: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append(freekv_state(server))
            time.sleep(0.2)

    w = threading.Thread(target=watch)
    w.start()
    try:
        outs = run_burst(server, 4)
    finally:
        done.set()
        w.join()
    assert all(o["meta_info"]["completion_tokens"] == NEW_TOKENS for o in outs)
    # Once every request decodes (all reclaimed), each holds sink + window + one partial page
    # of device slots at most, however long its context.
    decoding = [s for s in samples if s["rows"] == 4 and s["device_tokens_reclaimed"] > 0]
    assert decoding, "never saw the four requests decoding together"
    per_request = 32 + 32 + 16 + 1
    steady = [s for s in decoding if s["device_tokens_in_use"] <= 4 * per_request]
    assert steady, [s["device_tokens_in_use"] for s in decoding]
