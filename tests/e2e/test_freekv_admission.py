"""Admission and exhaustion under FreeKV: more long requests on the same device pool, and a
full host pool makes requests wait instead of failing.

Three CPU servers with the tiny model, started side by side:

- ``dense`` and ``freekv``: the same small device pool (``--max-total-tokens 2048``), SGLang with
  ``--kv-offload none`` and with FreeKV at a 128-token budget (layer 0 dense, so its decode
  reads reclaimed pages from the host pool; chunked prefill of 256 tokens). Eight ~700-token
  requests arrive at once. Dense SGLang can hold only two of them; FreeKV keeps each running
  request's sink and window on the device, gives the other slots back, and SGLang's own
  admission runs more of them side by side.
- ``small_host``: FreeKV with a host pool of 96 pages (1536 tokens, about three of the
  ~450-token requests sent to it) and a device pool of 1024 tokens. Reclaim frees the device
  slots, so the host pool is what binds: of 20 requests sent at once, SGLang's admission runs
  the few the host pool can hold and queues the rest.

Concurrency is read from SGLang's own decode log line (``#running-req``, ``#queue-req``), the
FreeKV figures from ``/server_info``.
"""

from __future__ import annotations

import re
import threading
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
# small_host: 96 host pages of 16 tokens (2 layers x 2 KV heads x 2 x 16 x 64 float32 = 32 KiB
# each); --context-length 1024 so that one full-length request (64 pages) fits, as required.
SMALL_HOST_PAGES = 96
SMALL_HOST_GB = SMALL_HOST_PAGES * 32 * 1024 / 2**30
SMALL_HOST_ARGS = (
    "--freekv-host-pool-gb",
    repr(SMALL_HOST_GB),
    "--context-length",
    "1024",
)
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
        "small_host": launch_server(
            tiny_llama_path(),
            *FREEKV,
            *COMMON,
            *SMALL_HOST_ARGS,
            # Exhaustion by live requests alone: no cached prefix holds host pages.
            "--disable-radix-cache",
            max_total_tokens=1024,
            startup_timeout_s=1800,
        ),
    }
    with launch_servers(managers) as handles:
        yield handles


def run_burst(server: ServerHandle, n: int, words: int = 170) -> list[dict]:
    """``n`` concurrent requests; returns their JSON results in order."""
    out: list[dict | None] = [None] * n

    def one(i: int) -> None:
        body = {
            "text": prompt(i, words),
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
    return max(decode_log_counts(server, "running-req"))


def decode_log_counts(server: ServerHandle, name: str) -> list[int]:
    """Every ``#<name>`` figure of SGLang's decode log lines so far."""
    text = server.log_path.read_text(errors="replace")
    counts = [int(m) for m in re.findall(rf"Decode batch[^\n]*?#{name}: (\d+)", text)]
    assert counts, "no decode log line"
    return counts


def test_freekv_runs_more_long_requests_at_once(servers: dict[str, ServerHandle]) -> None:
    results = {name: run_burst(servers[name], 8) for name in ("dense", "freekv")}
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
    state = servers["freekv"].freekv_state()
    assert state["rows_peak"] >= freekv_peak
    assert state["device_tokens_reclaimed_total"] > 0
    # Idle again: the host holds only the prefix cache, no reclaimed position is left, no
    # device slot in use.
    state = servers["freekv"].wait_freekv_idle()
    assert state["rows"] == 0
    assert state["host_pages_used"] == state["prefix_cache_pages"]
    assert state["pools_consistent"]
    assert state["device_tokens_reclaimed"] == 0
    assert state["device_tokens_in_use"] == 0


def test_device_slots_per_request_stay_at_the_budget(servers: dict[str, ServerHandle]) -> None:
    server = servers["freekv"]
    with server.sampling_freekv() as samples:
        outs = run_burst(server, 4)
    assert all(o["meta_info"]["completion_tokens"] == NEW_TOKENS for o in outs)
    # Once every request decodes (all reclaimed), each holds sink + window + one partial page
    # of device slots at most, however long its context.
    decoding = [s for s in samples if s["rows"] == 4 and s["device_tokens_reclaimed"] > 0]
    assert decoding, "never saw the four requests decoding together"
    per_request = 32 + 32 + 16 + 1
    steady = [s for s in decoding if s["device_tokens_in_use"] <= 4 * per_request]
    assert steady, [s["device_tokens_in_use"] for s in decoding]


def test_full_host_pool_queues_requests_and_all_complete(servers: dict[str, ServerHandle]) -> None:
    """Twenty requests at once against a host pool for about three: all finish, each with the
    tokens it gives when it runs alone, and the pool is consistent and empty afterwards."""
    server = servers["small_host"]
    n, words = 20, 100
    # Reference: each request alone (the same greedy FreeKV computation, no other request).
    alone = [run_burst_one(server, prompt(i, words)) for i in range(n)]
    capacity = server.freekv_state()["host_pages_capacity"]
    assert capacity == SMALL_HOST_PAGES
    request_tokens = [o["meta_info"]["prompt_tokens"] + NEW_TOKENS for o in alone]
    # "About three": the host pool holds between two and four of these requests.
    assert 2 * max(request_tokens) <= capacity * 16 < 4 * min(request_tokens) + 4 * 16
    # Every request exceeds the 128-token budget: its device slots are reclaimed, so the device
    # pool (1024 slots) would admit more than the host pool can hold.
    assert min(request_tokens) - NEW_TOKENS > 128

    with server.sampling_freekv() as samples:
        together = run_burst(server, n, words)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert b["meta_info"]["completion_tokens"] == NEW_TOKENS, i
        assert b["meta_info"]["finish_reason"]["type"] == "length", (i, b["meta_info"])
        assert b["output_ids"] == a["output_ids"], i
    # The host pool bound the burst: requests waited in SGLang's queue, at most as many ran as
    # the host pool holds, and the pool filled up to within one request of its capacity.
    assert max(decode_log_counts(server, "queue-req")) > 0
    assert max(s["rows"] for s in samples) <= capacity * 16 // min(request_tokens)
    peak_pages = max(s["host_pages_used"] for s in samples)
    assert peak_pages <= capacity
    assert peak_pages * 16 >= capacity * 16 - max(request_tokens) - 16, (peak_pages, capacity)
    assert all(s["pools_consistent"] for s in samples)
    state = server.wait_freekv_idle()
    assert state["rows"] == 0
    assert state["host_pages_used"] == 0
    assert state["device_tokens_in_use"] == 0
    assert state["pools_consistent"]
    assert requests.get(f"{server.base_url}/health", timeout=60).status_code == 200


def run_burst_one(server: ServerHandle, text: str) -> dict:
    body = {
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
    }
    r = requests.post(f"{server.base_url}/generate", json=body, timeout=900)
    r.raise_for_status()
    return dict(r.json())
