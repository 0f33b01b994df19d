"""Prefix sharing under FreeKV: SGLang's radix cache over host pages, end to end.

Three CPU servers with the tiny model and FreeKV at a 128-token budget (pages of 16 tokens):

- ``cache``: the session's shared FreeKV server (``conftest.py``), radix cache on (the plugin
  selects ``--radix-cache-backend freekv``);
- ``nocache``: the same with ``--disable-radix-cache``, the reference for outputs;
- ``small``: the radix cache on with a host pool of 160 pages (2560 tokens), so that eight
  shared prefixes and the requests using them do not fit and cached pages get evicted;
- ``faulted``: as ``cache``, with ``FREEKV_FAULTS`` failing the first offload job of every
  request whose rid starts with ``poison-c`` and the first recall of every one starting with
  ``poison-r``: the integrity tests pick their victims by rid. A failed, aborted or
  disconnected request must leave nothing in the cache: later requests sharing its prompt
  get the radix-off server's output.

Every server checks the pages it loads back against their offload checksums
(``FREEKV_VERIFY_PAGES=1``, set by ``conftest.py``); no check may fail.

Hits are read from SGLang's own ``meta_info["cached_tokens"]``, host use and the cache's
figures from ``/server_info`` (``internal_states[0]["freekv"]``), whose ``pools_consistent``
runs the host pool's invariant check and the prefix tree's (every cached page live, none
cached twice).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(2400)]

pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    FREEKV_SERVER_ARGS,
    ServerHandle,
    failure_of,
    freekv_test_args,
    launch_server,
    launch_servers,
)

PAGE = 16
# 160 pages of 16 tokens, 32 KiB each (2 layers x 2 KV heads x K/V x 16 x 64 float32).
SMALL_HOST_GB = 160 * 32 * 1024 / 2**30
VOCAB = 2048


@pytest.fixture(scope="module")
def servers(freekv_server: ServerHandle) -> Iterator[dict[str, ServerHandle]]:
    managers = {
        "nocache": launch_server(
            tiny_llama_path(),
            *FREEKV_SERVER_ARGS,
            "--disable-radix-cache",
            max_total_tokens=16384,
            startup_timeout_s=1800,
        ),
        "small": launch_server(
            tiny_llama_path(),
            *freekv_test_args(),
            "--context-length",
            "1024",
            "--freekv-host-pool-gb",
            repr(SMALL_HOST_GB),
            max_total_tokens=1024,
            startup_timeout_s=1800,
        ),
        "faulted": launch_server(
            tiny_llama_path(),
            *FREEKV_SERVER_ARGS,
            max_total_tokens=16384,
            env={"FREEKV_FAULTS": "conversion@poison-c,recall@poison-r"},
            startup_timeout_s=1800,
        ),
    }
    with launch_servers(managers) as handles:
        yield {"cache": freekv_server, **handles}


def ids(seed: int, n: int) -> list[int]:
    """``n`` token ids from a seeded generator (ids 3.. avoid BOS/EOS/PAD)."""
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def generate(
    server: ServerHandle, input_ids: list[int], new_tokens: int = 16, rid: str | None = None
) -> dict:
    r = post(server, input_ids, new_tokens, rid)
    r.raise_for_status()
    return dict(r.json())


def post(
    server: ServerHandle, input_ids: list[int], new_tokens: int = 16, rid: str | None = None
) -> requests.Response:
    body: dict = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True},
    }
    if rid is not None:
        body["rid"] = rid
    return requests.post(f"{server.base_url}/generate", json=body, timeout=900)


def assert_pages_checked(server: ServerHandle) -> dict:
    state = server.wait_freekv_idle()
    assert state["page_checks_on"] is True
    assert state["page_check_failures_total"] == 0, state
    assert state["pools_consistent"], state
    assert state["host_pages_used"] == state["prefix_cache_pages"], state
    return state


def flush(server: ServerHandle) -> None:
    requests.post(f"{server.base_url}/flush_cache", timeout=60).raise_for_status()


def test_shared_prefix_is_reused_from_host_pages(servers: dict[str, ServerHandle]) -> None:
    cache, nocache = servers["cache"], servers["nocache"]
    flush(cache)
    prefix = ids(1, 2048)
    first_ids, second_ids = prefix + ids(2, 40), prefix + ids(3, 56)
    before = cache.wait_freekv_idle()
    first = generate(cache, first_ids)
    after_first = cache.wait_freekv_idle()
    second = generate(cache, second_ids)
    after_second = cache.wait_freekv_idle()

    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= 2048 - PAGE
    # The second request adopted the shared pages instead of offloading its own copy; the
    # cache grew by its suffix and outputs only.
    shared = second["meta_info"]["cached_tokens"] // PAGE
    adopted = after_second["prefix_pages_adopted_total"] - after_first["prefix_pages_adopted_total"]
    assert adopted == shared
    # Prompts are cached (prefill is dense); the outputs, decoded over budget, are not.
    grown = after_second["prefix_cache_pages"] - after_first["prefix_cache_pages"]
    assert grown == len(second_ids) // PAGE - shared > 0
    assert after_first["prefix_cache_pages"] - before["prefix_cache_pages"] == (
        len(first_ids) // PAGE
    )
    # Idle: the host pool holds exactly the cached pages.
    assert after_second["host_pages_used"] == after_second["prefix_cache_pages"]
    assert after_second["pools_consistent"]
    # Outputs equal the same requests with the radix cache off.
    assert first["output_ids"] == generate(nocache, first_ids)["output_ids"]
    assert second["output_ids"] == generate(nocache, second_ids)["output_ids"]
    # Every shared page loaded back was the K/V offloaded into it.
    state = assert_pages_checked(cache)
    assert state["page_checks_total"] >= shared * 2  # 2 layers


def test_multi_turn_chat_reuses_every_earlier_turn(servers: dict[str, ServerHandle]) -> None:
    cache, nocache = servers["cache"], servers["nocache"]
    flush(cache)
    history: list[int] = ids(10, 300)
    prev_prompt = 0
    for turn in range(5):
        out = generate(cache, history, new_tokens=24)
        ref = generate(nocache, history, new_tokens=24)
        assert out["output_ids"] == ref["output_ids"], turn
        if turn:
            # Every earlier turn up to the previous prompt, in whole pages. The previous
            # answer was decoded with sparse attention (the context exceeds the budget), so
            # it is not shared; this turn prefills it densely and the next turn reuses it.
            assert out["meta_info"]["cached_tokens"] == PAGE * (prev_prompt // PAGE), turn
        prev_prompt = len(history)
        history = history + out["output_ids"] + ids(100 + turn, 50)
    state = cache.wait_freekv_idle()
    assert state["pools_consistent"]


def test_small_host_pool_evicts_cached_prefixes_and_keeps_serving(
    servers: dict[str, ServerHandle],
) -> None:
    """64 requests over 8 shared prefixes against a host pool that holds about five of them
    with their requests: every request completes with the reference output, the pools stay
    consistent at every sample, pages are evicted, and at the end the pool holds exactly the
    cached set."""
    small, nocache = servers["small"], servers["nocache"]
    prefixes = [ids(200 + i, 256) for i in range(8)]
    rng = random.Random(5)
    work = [prefixes[rng.randrange(8)] + ids(300 + j, 48) for j in range(64)]
    results: list[dict | None] = [None] * len(work)

    def client(indices: list[int]) -> None:
        for i in indices:
            results[i] = generate(small, work[i])

    clients = [threading.Thread(target=client, args=(list(range(c, 64, 4)),)) for c in range(4)]
    with small.sampling_freekv(every_s=0.3) as samples:
        for t in clients:
            t.start()
        for t in clients:
            t.join()
    assert all(r is not None for r in results)
    hits = sum(1 for r in results if r and r["meta_info"]["cached_tokens"] >= 256 - PAGE)
    assert hits >= 16, hits
    state = small.wait_freekv_idle()
    assert state["prefix_pages_evicted_total"] > 0
    assert all(s["pools_consistent"] for s in samples)
    assert max(s["host_pages_used"] for s in samples) <= state["host_pages_capacity"]
    assert state["pools_consistent"]
    assert state["rows"] == 0
    assert state["host_pages_used"] == state["prefix_cache_pages"] > 0
    # Correct outputs: the same requests alone on the server without a radix cache.
    for i in range(0, 64, 8):
        assert results[i] is not None
        assert results[i]["output_ids"] == generate(nocache, work[i])["output_ids"], i


# --- integrity: nothing a failed request computed is ever served ------------------------------


def assert_nothing_was_published(
    servers: dict[str, ServerHandle], prompt: list[int], seed: int
) -> None:
    """After ``prompt``'s request failed on the faulted server: a request sharing its first
    200 tokens, then the prompt itself, get the radix-off server's outputs; the first finds
    nothing cached (the second may reuse what the first published)."""
    faulted, nocache = servers["faulted"], servers["nocache"]
    sharing = prompt[:200] + ids(seed, 100)
    out = generate(faulted, sharing, new_tokens=40)
    assert out["meta_info"]["cached_tokens"] == 0, out["meta_info"]
    assert out["output_ids"] == generate(nocache, sharing, new_tokens=40)["output_ids"]
    again = generate(faulted, prompt, new_tokens=40)
    assert again["output_ids"] == generate(nocache, prompt, new_tokens=40)["output_ids"]
    assert_pages_checked(faulted)


@pytest.mark.parametrize("kind", ["offload", "recall"])
def test_a_failed_request_publishes_nothing(servers: dict[str, ServerHandle], kind: str) -> None:
    """The reproduction: a 300-token prompt whose offload (or recall) fails gets an error,
    and neither its resend nor a prompt sharing its prefix is served from its pages."""
    faulted = servers["faulted"]
    seed = {"offload": 400, "recall": 401}[kind]
    prompt = ids(seed, 300)
    rid = {"offload": "poison-c-1", "recall": "poison-r-1"}[kind]
    r = post(faulted, prompt, new_tokens=40, rid=rid)
    message = failure_of(r)
    assert message is not None, r.text[:500]
    assert {"offload": "offload of layer", "recall": "recall into layer"}[kind] in message
    assert_pages_checked(faulted)
    assert_nothing_was_published(servers, prompt, seed + 100)


def test_an_abort_during_prefill_publishes_nothing(servers: dict[str, ServerHandle]) -> None:
    """A long prompt aborted by rid while it is being prefilled (or queued): it finishes with
    an abort and leaves nothing cached."""
    faulted = servers["faulted"]
    prompt = ids(402, 6000)
    results: list[requests.Response] = []
    worker = threading.Thread(
        target=lambda: results.append(post(faulted, prompt, new_tokens=40, rid="abort-prefill-1"))
    )
    worker.start()
    deadline = time.monotonic() + 60
    # Abort once the request is in the scheduler (its row exists), before it finished.
    while time.monotonic() < deadline and faulted.freekv_state()["rows"] == 0:
        time.sleep(0.02)
    requests.post(
        f"{faulted.base_url}/abort_request", json={"rid": "abort-prefill-1"}, timeout=60
    ).raise_for_status()
    worker.join(timeout=600)
    assert results and failure_of(results[0]) is not None, results[0].text[:500]
    assert_pages_checked(faulted)
    assert_nothing_was_published(servers, prompt, 502)


def test_a_client_that_goes_away_mid_decode_publishes_nothing(
    servers: dict[str, ServerHandle],
) -> None:
    """A streamed request whose client disconnects after a few tokens (its pages' offload jobs
    still being written as it decodes) is aborted by SGLang and leaves nothing cached."""
    faulted = servers["faulted"]
    prompt = ids(403, 300)
    body = {
        "input_ids": prompt,
        "rid": "gone-1",
        "stream": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True},
    }
    with requests.post(f"{faulted.base_url}/generate", json=body, stream=True, timeout=600) as r:
        chunks = 0
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                chunks += 1
            if chunks >= 3:
                break
    assert chunks >= 3
    assert_pages_checked(faulted)
    assert_nothing_was_published(servers, prompt, 503)
