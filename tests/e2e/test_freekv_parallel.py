"""FreeKV under SGLang's tensor and data parallelism, on the CPU (gloo process groups).

The tiny model has 4 query and 2 KV heads, so at ``--tp 2`` each rank holds one KV head and its
own FreeKV runtime (host pool, conversion threads, budget regions). Four servers, started side
by side, all with a 128-token FreeKV budget where FreeKV is on:

- ``tp1``: FreeKV on one rank, the reference;
- ``dense_tp2``: ``--kv-offload none --tp 2``;
- ``tp2``: FreeKV ``--tp 2`` with a host pool of :data:`HOST_PAGES` pages per rank (about three
  of the requests below) and a recall fault planned on rank 1 only, for requests whose rid
  starts with ``victim``;
- ``dp2``: FreeKV ``--dp 2`` (two schedulers, one runtime each).

Greedy outputs of the same parallel layout are compared token for token. Across layouts
(``--tp 2`` against ``--tp 1``) the all-reduce sums the attention and MLP outputs in another
order, and on this random-weight model, whose logits are close to flat, that can turn a near
tie: there the outputs must agree up to the first differing position, and at that position the
``--tp 1`` run's top two tokens must be within :data:`TIE_MARGIN` of each other in log
probability, with ``--tp 2`` taking the second (the assertion message names the request, the
position and the margin).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(1800)]

pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    ServerHandle,
    failure_of,
    freekv_test_args,
    launch_server,
    launch_servers,
)

#: One OpenMP thread per rank on a small host (SGLang's CPU backend otherwise binds each rank
#: to a NUMA node's cores, and this host has one node for two ranks).
TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
CONTEXT = ("--context-length", "1024")
FREEKV = (*freekv_test_args(), *CONTEXT, "--decode-log-interval", "4")
#: Per-rank host page at --tp 2: 2 layers x 1 KV head x (K, V) x 16 tokens x 64 x float32.
PAGE_BYTES_TP2 = 2 * 1 * 2 * 16 * 64 * 4
#: About three of the 100-word requests below (each ~30 pages) per rank; at least the device
#: pool (--max-total-tokens 1024 = 64 pages), as the runtime requires.
HOST_PAGES = 96
NEW_TOKENS = 24
#: Largest top-1 / top-2 log-probability gap a different summation order may flip (float32
#: rounding of the logits is about 1e-6 of their size).
TIE_MARGIN = 1e-3
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def prompt(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 5 + j * (seed + 2)) % len(WORDS)] for j in range(words))


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerHandle]]:
    model = tiny_llama_path()
    managers = {
        "tp1": launch_server(model, *FREEKV, max_total_tokens=2048, startup_timeout_s=1500),
        "dense_tp2": launch_server(
            model,
            "--kv-offload",
            "none",
            "--tp",
            "2",
            *CONTEXT,
            max_total_tokens=2048,
            env=TP_ENV,
            startup_timeout_s=1500,
        ),
        "tp2": launch_server(
            model,
            *FREEKV,
            "--tp",
            "2",
            "--freekv-host-pool-gb",
            repr(HOST_PAGES * PAGE_BYTES_TP2 / 2**30),
            max_total_tokens=1024,
            env={**TP_ENV, "FREEKV_FAULTS": "recall@victim/rank=1"},
            startup_timeout_s=1500,
        ),
        "dp2": launch_server(
            model, *FREEKV, "--dp", "2", max_total_tokens=2048, env=TP_ENV, startup_timeout_s=1500
        ),
    }
    with launch_servers(managers) as handles:
        yield handles


def generate(server: ServerHandle, text: str, rid: str | None = None, new: int = NEW_TOKENS):
    body: dict = {
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
    }
    if rid is not None:
        body["rid"] = rid
    body["return_logprob"] = True
    body["top_logprobs_num"] = 2
    return requests.post(f"{server.base_url}/generate", json=body, timeout=900)


class Output(list):
    """Greedy output ids, with the top two (log probability, token id) of every position."""

    top: list[list[tuple[float, int]]]


def output_of(body: dict) -> Output:
    out = Output(body["output_ids"])
    out.top = [
        [(lp, tok) for lp, tok, *_ in pos] for pos in body["meta_info"]["output_top_logprobs"]
    ]
    return out


def outputs(server: ServerHandle, texts: list[str], rid_prefix: str) -> list[Output]:
    """Greedy outputs of ``texts`` sent at once."""
    got: dict[int, Output] = {}

    errors: list[str] = []

    def one(i: int) -> None:
        r = generate(server, texts[i], rid=f"{rid_prefix}-{i}")
        if r.status_code != 200:
            errors.append(f"{rid_prefix}-{i}: {r.status_code} {r.text[:300]}")
            return
        got[i] = output_of(r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    return [got[i] for i in range(len(texts))]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def assert_same(got: list[list[int]], want: list[list[int]], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"{what}: request {i} differs first at token {first_difference(g, w)}"


def assert_same_up_to_near_tie(got: list[Output], want: list[Output], what: str) -> None:
    """``got`` equals ``want`` (another parallel layout), or differs first where ``want``'s top
    two tokens were within :data:`TIE_MARGIN` and ``got`` took the second."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        k = first_difference(g, w)
        if k is None:
            assert len(g) == len(w), (what, i)
            continue
        (lp1, _t1), (lp2, t2) = w.top[k][:2]
        assert g[k] == t2 and lp1 - lp2 < TIE_MARGIN, (
            f"{what}: request {i} differs first at token {k}: got {g[k]}, want {w[k]}; "
            f"top-2 margin there {lp1 - lp2:.2e} (second choice {t2})"
        )


def rank_states(server: ServerHandle) -> list[dict]:
    state = server.freekv_state()
    return state.get("ranks", [state])


def wait_idle(server: ServerHandle, timeout_s: float = 120.0) -> list[dict]:
    """Every rank's figures once no request row is left on any (or at the deadline)."""
    deadline = time.monotonic() + timeout_s
    states = rank_states(server)
    while any(s["rows"] for s in states) and time.monotonic() < deadline:
        time.sleep(1.0)
        states = rank_states(server)
    return states


def test_within_budget_tp2_equals_dense_tp2_and_freekv_tp1(
    servers: dict[str, ServerHandle],
) -> None:
    # ~4.6 tokens per word with the tiny model's tokenizer: 28 to 83 prompt tokens, so prompt
    # and output stay under the 128-token budget.
    texts = [prompt(i, 6 + 4 * i) for i in range(4)]
    dense = outputs(servers["dense_tp2"], texts, "short-dense")
    got = outputs(servers["tp2"], texts, "short-tp2")
    assert_same(got, dense, "FreeKV --tp 2 against dense --tp 2")
    want = outputs(servers["tp1"], texts, "short-tp1")
    assert_same_up_to_near_tie(got, want, "FreeKV --tp 2 against FreeKV --tp 1")


def test_over_budget_tp2_equals_tp1_with_aborts(servers: dict[str, ServerHandle]) -> None:
    """Eight concurrent requests of mixed lengths over the budget, two of them aborted by
    rid: the others give FreeKV --tp 1's tokens, and both ranks' pools empty afterwards."""
    tp1, tp2 = servers["tp1"], servers["tp2"]
    lengths = [60, 120, 100, 150, 40, 130, 110, 80]  # words: ~180 to ~700 tokens
    texts = [prompt(i, w) for i, w in enumerate(lengths)]
    want = outputs(tp1, texts, "mixed-tp1")
    got: dict[int, object] = {}

    def one(i: int) -> None:
        r = generate(
            tp2, texts[i], rid=f"mixed-tp2-{i}", new=NEW_TOKENS if i not in (1, 6) else 300
        )
        got[i] = r.json() if r.status_code == 200 else r

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    time.sleep(3.0)
    for i in (1, 6):  # long-running ones: still decoding when the abort arrives
        requests.post(f"{tp2.base_url}/abort_request", json={"rid": f"mixed-tp2-{i}"}, timeout=60)
    for t in threads:
        t.join(timeout=900)
    aborted = 0
    for i in range(len(texts)):
        body = got[i]
        if i in (1, 6):
            # Aborted while queued (an error status) or while decoding (an abort finish).
            if not isinstance(body, dict) or body["meta_info"]["finish_reason"]["type"] == "abort":
                aborted += 1
            continue
        assert isinstance(body, dict), (i, body)
        assert_same_up_to_near_tie([output_of(body)], [want[i]], f"FreeKV --tp 2 request {i}")
    assert aborted == 2, [got[1], got[6]]
    states = wait_idle(tp2)
    assert [s["tp_rank"] for s in states] == [0, 1]
    for s in states:
        assert s["rows"] == 0 and s["device_tokens_in_use"] == 0 and s["pools_consistent"], s
        assert s["host_pages_used"] == s["prefix_cache_pages"], s
        assert s["pages_recalled"] > 0, s
    assert requests.get(f"{tp2.base_url}/health", timeout=60).status_code == 200


def test_recall_fault_on_one_rank_aborts_its_request_on_all(
    servers: dict[str, ServerHandle],
) -> None:
    """A recall fails on rank 1 only: the request aborts with the message (rank 0 joins the
    abort), the requests beside it finish, and nothing hangs."""
    tp1, tp2 = servers["tp1"], servers["tp2"]
    texts = [prompt(20 + i, 150) for i in range(3)]
    want = outputs(tp1, texts, "fault-ref")
    rids = ["fault-ok-0", "victim-1", "fault-ok-2"]
    got: dict[int, requests.Response] = {}

    def one(i: int) -> None:
        got[i] = generate(tp2, texts[i], rid=rids[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(not t.is_alive() for t in threads), "a request hung"
    message = failure_of(got[1])
    assert message is not None and "recall" in message and "rank 1" in message, got[1].text
    for i in (0, 2):
        assert got[i].status_code == 200, got[i].text
        assert_same_up_to_near_tie([output_of(got[i].json())], [want[i]], f"request {rids[i]}")
    states = wait_idle(tp2)
    assert all(s["rows"] == 0 and s["pools_consistent"] for s in states), states
    assert requests.get(f"{tp2.base_url}/health", timeout=60).status_code == 200


def test_small_host_pools_queue_and_every_request_gets_its_solo_output(
    servers: dict[str, ServerHandle],
) -> None:
    """Each rank's host pool holds about three requests; twelve sent at once all complete,
    each with the tokens it gives alone, and neither rank's pool overflowed."""
    tp2 = servers["tp2"]
    texts = [prompt(40 + i, 100) for i in range(12)]
    alone = [outputs(tp2, [t], f"solo-{i}")[0] for i, t in enumerate(texts)]
    with tp2.sampling_freekv() as samples:
        together = outputs(tp2, texts, "burst")
    assert_same(together, alone, "burst against solo")
    per_rank = [r for s in samples for r in s.get("ranks", [])]
    assert per_rank and all(r["host_pages_capacity"] == HOST_PAGES for r in per_rank)
    assert max(r["rows"] for r in per_rank) <= 4  # the host pools bound admission
    assert all(r["host_pages_used"] <= HOST_PAGES and r["pools_consistent"] for r in per_rank)
    # Ranks agree: at every sample both ran the same number of requests.
    for s in samples:
        ranks = s.get("ranks", [])
        assert len({r["rows"] for r in ranks}) <= 1, ranks


def test_dp2_equals_dp1_with_figures_per_rank(servers: dict[str, ServerHandle]) -> None:
    tp1, dp2 = servers["tp1"], servers["dp2"]
    texts = [prompt(60 + i, 60 + 20 * i) for i in range(4)]
    assert_same(outputs(dp2, texts, "dp2"), outputs(tp1, texts, "dp1"), "FreeKV --dp 2")
    r = requests.get(f"{dp2.base_url}/server_info", timeout=60)
    r.raise_for_status()
    states = [s["freekv"] for s in r.json()["internal_states"]]
    assert sorted(s["dp_rank"] for s in states) == [0, 1], states
    assert sum(s["pages_recalled"] for s in states) > 0
