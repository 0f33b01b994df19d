"""SGLang frontend programs on an in-process ``sglang.Engine`` through ``EngineBackend``.

The program of ``test_freekv_server.test_frontend_program_through_runtime_endpoint`` (multi-turn
``gen``, ``fork`` of 2, join) and a ``select`` run through
:class:`freekv_sglang.sglang.frontend.EngineBackend` on two engines, one after the other (two
live engines in one process would kill each other's subprocesses at shutdown): first SGLang
with ``kv_offload="none"``, then FreeKV at a 128-token budget (32 sink + 4 pages of 16 + 32
window, no dense layer) enabled through the ``Engine`` keywords. The short program fits the
budget, so greedy outputs must be equal; a long-topic program goes over it and must run
through the host pool.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(1800)]

sglang = pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import engine_kwargs  # noqa: E402

FREEKV: dict[str, object] = {
    "kv_offload": "freekv",
    "freekv_budget": 128,
    "freekv_sink": 32,
    "freekv_window": 32,
    "freekv_page_size": 16,
    "freekv_dense_layers": (),
}
TOPIC = "gamma delta"
TOPICS = ["alpha beta", "gamma delta", "epsilon zeta eta", "theta iota", "kappa lambda mu"]
#: Choices that the tiny model's tokenizer keeps as one token after "...Answer:".
CHOICES = [" a", " b", " g", " d", " no"]
SELECT_PREFIX = "Topic: {}\nAnswer:"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


@sglang.function
def program(s, topic):  # type: ignore[no-untyped-def]
    s += "Topic: " + topic + "\nFirst:"
    s += sglang.gen("first", max_tokens=12, temperature=0)
    s += "\nSecond:"
    s += sglang.gen("second", max_tokens=12, temperature=0)
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"\nBranch {i}:"
        f += sglang.gen("branch", max_tokens=8, temperature=0)
    s += "\nJoined: " + forks[0]["branch"] + " | " + forks[1]["branch"]


@sglang.function
def pick(s, topic):  # type: ignore[no-untyped-def]
    s += SELECT_PREFIX.format(topic)
    s += sglang.select("answer", choices=CHOICES)


@sglang.function
def long_program(s, topic):  # type: ignore[no-untyped-def]
    s += "Topic: " + topic + "\nFirst:"
    s += sglang.gen("first", max_tokens=16, temperature=0, ignore_eos=True)
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"\nBranch {i}:"
        f += sglang.gen("branch", max_tokens=8, temperature=0, ignore_eos=True)
    s += "\nJoined: " + forks[0]["branch"] + " | " + forks[1]["branch"]


def long_topic(words: int) -> str:
    return " ".join(WORDS[(j * 5 + j // 7) % len(WORDS)] for j in range(words))


def run_suite(engine: Any) -> dict[str, Any]:
    """What both engines are asked: the program, a batch of it, streamed, and a select."""
    from freekv_sglang.sglang.frontend import EngineBackend

    backend = EngineBackend(engine)
    state = program.run(topic=TOPIC, backend=backend)
    batch = program.run_batch([{"topic": t} for t in TOPICS], backend=backend, num_threads=4)
    streamed = program.run(topic=TOPIC, backend=backend, stream=True)
    # Per variable: the whole-text iterator of SGLang 0.5.23 can miss its last wake-up.
    pieces = list(streamed.text_iter("second"))
    # The streamed program runs on its own thread and forks after "second": let it end before
    # the caller shuts the engine down, or its last requests would wait on a dead engine.
    deadline = time.monotonic() + 300
    while not streamed.stream_executor.is_finished:
        assert time.monotonic() < deadline, "the streamed program did not finish"
        time.sleep(0.05)
    choice = pick.run(topic=TOPIC, backend=backend)
    return {
        "text": state.text(),
        "vars": {k: state[k] for k in ("first", "second")},
        "meta": state.get_meta_info("first"),
        "meta_second": state.get_meta_info("second"),
        "batch": [s.text() for s in batch],
        "stream_pieces": pieces,
        "stream_text": streamed.text(),
        "stream_meta": streamed.get_meta_info("second"),
        "answer": choice["answer"],
        "answer_meta": choice.get_meta_info("answer"),
    }


@pytest.fixture(scope="module")
def dense_results() -> dict[str, Any]:
    """The suite on ``kv_offload="none"``; that engine is shut down before FreeKV's starts."""
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the Engine keywords hook attaches with the plugins
    engine = sglang.Engine(**engine_kwargs(tiny_llama_path(), kv_offload="none"))
    try:
        return run_suite(engine)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def freekv_engine(dense_results: dict[str, Any]) -> Iterator[Any]:
    engine = sglang.Engine(**engine_kwargs(tiny_llama_path(), max_total_tokens=8192, **FREEKV))
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def freekv_results(freekv_engine: Any) -> dict[str, Any]:
    return run_suite(freekv_engine)


def freekv_state(engine: Any) -> dict[str, Any]:
    return dict(engine.get_server_info()["internal_states"][0]["freekv"])


def greedy(engine: Any, text: str, max_new_tokens: int) -> str:
    out = engine.generate(text, {"temperature": 0, "max_new_tokens": max_new_tokens})
    return str(out["text"])


def test_program_through_engine_matches_dense(
    dense_results: dict[str, Any], freekv_results: dict[str, Any], freekv_engine: Any
) -> None:
    assert freekv_results["text"] == dense_results["text"]
    assert freekv_results["batch"] == dense_results["batch"]
    assert "\nJoined: " in freekv_results["text"]
    assert freekv_results["meta"]["completion_tokens"] <= 12
    # FreeKV is on in this engine (its counters are in the scheduler state), off in the other.
    assert freekv_state(freekv_engine)["host_pages_capacity"] > 0


def test_program_equals_the_requests_it_stands_for(
    freekv_results: dict[str, Any], freekv_engine: Any
) -> None:
    """The backend's text is what plain ``Engine.generate`` calls give for the same prompts."""
    text = f"Topic: {TOPIC}\nFirst:"
    first = greedy(freekv_engine, text, 12)
    text += first + "\nSecond:"
    second = greedy(freekv_engine, text, 12)
    text += second
    branches = [greedy(freekv_engine, text + f"\nBranch {i}:", 8) for i in range(2)]
    want = text + "\nJoined: " + branches[0] + " | " + branches[1]
    assert freekv_results["vars"] == {"first": first, "second": second}
    assert freekv_results["text"] == want
    # One program alone and inside a concurrent batch of five give the same text.
    assert freekv_results["batch"][TOPICS.index(TOPIC)] == want


def test_streamed_program_equals_the_unstreamed_one(freekv_results: dict[str, Any]) -> None:
    assert freekv_results["stream_text"] == freekv_results["text"]
    assert "".join(freekv_results["stream_pieces"]) == freekv_results["vars"]["second"]
    assert (
        freekv_results["stream_meta"]["completion_tokens"]
        == freekv_results["meta_second"]["completion_tokens"]
    )


def test_select_picks_the_likeliest_choice(
    dense_results: dict[str, Any], freekv_results: dict[str, Any], freekv_engine: Any
) -> None:
    assert freekv_results["answer"] == dense_results["answer"]
    # Prefill is dense in both engines, but the choices reuse the prefix from different caches:
    # FreeKV's shares whole 16-token pages, SGLang's every token, so the uncached part that
    # each prefills (and the float32 sums over it) differs (differences of ~5e-7 seen).
    assert freekv_results["answer_meta"]["normalized_prompt_logprobs"] == pytest.approx(
        dense_results["answer_meta"]["normalized_prompt_logprobs"], rel=1e-5, abs=1e-5
    )
    # Every choice is one token after the prefix, so the choice with the largest mean logprob
    # is the one with the largest next-token logprob: ask the engine for those directly.
    tok = freekv_engine.tokenizer_manager.tokenizer
    prefix = SELECT_PREFIX.format(TOPIC)
    base = tok.encode(prefix, add_special_tokens=False)
    ids = []
    for c in CHOICES:
        full = tok.encode(prefix + c, add_special_tokens=False)
        assert full[: len(base)] == base and len(full) == len(base) + 1, c
        ids.append(full[-1])
    out = freekv_engine.generate(
        prefix,
        {"temperature": 0, "max_new_tokens": 1},
        return_logprob=True,
        token_ids_logprob=ids,
    )
    by_id = {entry[1]: entry[0] for entry in out["meta_info"]["output_token_ids_logprobs"][0]}
    best = max(range(len(CHOICES)), key=lambda i: by_id[ids[i]])
    assert freekv_results["answer"] == CHOICES[best]


def test_gen_parameters_reach_the_engine(freekv_engine: Any) -> None:
    from freekv_sglang.sglang.frontend import EngineBackend

    backend = EngineBackend(freekv_engine)

    @sglang.function
    def gens(s, stop_word):  # type: ignore[no-untyped-def]
        # Not named ``stop``: ``SglFunction.run`` takes ``stop`` as a default sampling parameter.
        s += "Topic: kappa lambda\nText:"
        s += sglang.gen("full", max_tokens=16, temperature=0)
        s += "\nAgain:"
        s += sglang.gen("stopped", max_tokens=16, temperature=0, stop=stop_word)
        s += "\nSampled:"
        s += sglang.gen("sampled", max_tokens=6, temperature=0.8, top_p=0.9, ignore_eos=True)

    full = greedy(freekv_engine, "Topic: kappa lambda\nText:", 16)
    again = greedy(freekv_engine, "Topic: kappa lambda\nText:" + full + "\nAgain:", 16)
    words = again.split()
    assert len(words) >= 2, again
    stop = words[1]  # a stop string the second gen is known to reach
    state = gens.run(stop_word=stop, backend=backend)
    assert state["full"] == full
    assert state["stopped"] == again[: again.index(stop)]
    assert state.get_meta_info("sampled")["completion_tokens"] == 6
    assert backend.get_model_name() == str(tiny_llama_path())


def test_over_budget_program_runs_through_the_host_pool(freekv_engine: Any) -> None:
    from freekv_sglang.sglang.frontend import EngineBackend

    before = freekv_state(freekv_engine)
    state = long_program.run(topic=long_topic(300), backend=EngineBackend(freekv_engine))
    meta = state.get_meta_info("first")
    assert meta["prompt_tokens"] > 4 * 128
    assert meta["completion_tokens"] == 16
    assert "\nJoined: " in state.text() and "\nBranch" not in state.text()
    after = freekv_state(freekv_engine)
    assert after["pages_recalled"] > before["pages_recalled"]
    assert after["host_pages_used"] == after["prefix_cache_pages"] and after["pools_consistent"]


def test_normalized_prompt_logprob_counts_zero_logprobs() -> None:
    """A token scored 0.0 (probability 1) is part of the mean; only a missing one is skipped."""
    from freekv_sglang.sglang.frontend import _normalized_prompt_logprob

    window = [[None, 1, "A"], [0.0, 7, " b"], [-1.5, 9, " c"], [0.0, 4, "."]]
    assert _normalized_prompt_logprob(window) == -0.5
    assert _normalized_prompt_logprob([[0.0, 7, " b"]]) == 0.0


def test_normalized_prompt_logprob_of_a_window_without_scores_is_minus_infinity() -> None:
    from freekv_sglang.sglang.frontend import _normalized_prompt_logprob

    assert _normalized_prompt_logprob([]) == float("-inf")
    assert _normalized_prompt_logprob([[None, 1, "A"]]) == float("-inf")


def test_loop_driver_runs_concurrent_calls_and_returns_the_loop_idle() -> None:
    """The driver behind EngineBackend, on a real loop: concurrent callers overlap on the loop
    thread, and afterwards the loop is idle for ``run_until_complete`` on this thread."""
    from freekv_sglang.sglang.frontend import _LoopDriver

    loop = asyncio.new_event_loop()
    try:
        driver = _LoopDriver(loop)
        # Backends of one loop share one driver (and its in-flight count).
        assert _LoopDriver.for_loop(loop) is _LoopDriver.for_loop(loop)
        inside = 0
        peak = 0
        release = asyncio.Event()

        async def call(i: int) -> tuple[int, str]:
            nonlocal inside, peak
            inside += 1
            peak = max(peak, inside)
            if inside == 4:
                release.set()
            await asyncio.wait_for(release.wait(), timeout=30)
            inside -= 1
            return i, threading.current_thread().name

        results: dict[int, tuple[int, str]] = {}

        def worker(i: int) -> None:
            results[i] = driver.run(call(i))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert peak == 4  # all four requests were in flight at once
        assert sorted(results) == [0, 1, 2, 3]
        assert {r[0] for r in results.values()} == {0, 1, 2, 3}
        assert {r[1] for r in results.values()} == {"freekv-engine-loop"}
        assert not loop.is_running()
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
        # A second round starts the loop thread again.
        assert driver.run(asyncio.sleep(0, result=8)) == 8
        # The driver refuses to start a loop that is already running elsewhere.

        async def nested() -> None:
            with pytest.raises(RuntimeError, match="already running"):
                driver.enter()

        loop.run_until_complete(nested())
    finally:
        loop.close()
