"""``--kv-offload freekv`` end to end: the real SGLang server on CPU with the tiny model.

Three servers: the session's shared dense and FreeKV servers (``conftest.py``: FreeKV at a
128-token budget, 32 sink + 4 selected pages of 16 + 32 window, no dense layer, so prompts of a
few dozen tokens fit the budget and ~1K-token prompts exceed it), and this module's FreeKV server
with the overlap scheduler off and SGLang's retraction test mode on (``SGLANG_TEST_RETRACT``:
every 4th decode step retracts running requests, which resume by prefilling again).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import pytest
import requests

# Server start-up alone takes minutes on a loaded 2-core host: allow for it.
pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(2400)]

sglang = pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    FREEKV_SERVER_ARGS,
    ServerHandle,
    launch_server,
)

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
]


def short_prompts(n: int = 20) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 7)) for i in range(n)]


def long_prompt(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + j * (seed + 3)) % len(WORDS)] for j in range(words))


def generate(server: ServerHandle, texts: list[str], max_new_tokens: int, **extra: object) -> list:
    body = {
        "text": texts,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens},
        **extra,
    }
    r = requests.post(f"{server.base_url}/generate", json=body, timeout=900)
    r.raise_for_status()
    return list(r.json())


def stats_lines(server: ServerHandle, mark: int = 0) -> list[dict[str, float]]:
    """The FreeKV figures of every ``freekv:`` log line written since ``mark``."""
    pat = re.compile(
        r"freekv: correction rate ([\d.]+) \((\d+)/(\d+) head checks\), pages recalled (\d+) "
        r".*host pool (\d+)/(\d+) pages"
    )
    out = []
    for m in pat.finditer(server.log_since(mark)):
        out.append(
            {
                "correction_rate": float(m[1]),
                "corrections": int(m[2]),
                "checks": int(m[3]),
                "pages_recalled": int(m[4]),
                "host_used": int(m[5]),
                "host_capacity": int(m[6]),
            }
        )
    return out


@pytest.fixture(scope="module")
def retract() -> Iterator[ServerHandle]:
    """FreeKV with the overlap scheduler off and SGLang's retraction test mode on."""
    with launch_server(
        tiny_llama_path(),
        *FREEKV_SERVER_ARGS,
        "--disable-overlap-schedule",
        max_total_tokens=16384,
        env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "4"},
        startup_timeout_s=1800,
    ) as handle:
        yield handle


@pytest.fixture
def dense(dense_server: ServerHandle) -> ServerHandle:
    return dense_server


@pytest.fixture
def freekv(freekv_server: ServerHandle) -> ServerHandle:
    return freekv_server


def test_within_budget_outputs_equal_dense(dense: ServerHandle, freekv: ServerHandle) -> None:
    dense_mark = dense.log_mark()
    prompts = short_prompts(20)
    want = [o["text"] for o in generate(dense, prompts, 40)]
    got_batched = [o["text"] for o in generate(freekv, prompts, 40)]
    assert got_batched == want
    got_single = [generate(freekv, [p], 40)[0]["text"] for p in prompts]
    assert got_single == want
    assert "freekv: budget 128 tokens" in freekv.log_path.read_text(errors="replace")
    dense_log = dense.log_since(dense_mark)
    assert "freekv: budget" not in dense_log and "freekv: correction rate" not in dense_log


def test_over_budget_serves_repeatably_through_the_host_pool(freekv: ServerHandle) -> None:
    mark = freekv.log_mark()
    prompts = [long_prompt(s, 250) for s in range(4)]  # ~1K tokens each, budget 128
    first = generate(freekv, prompts, 48)
    for o in first:
        assert o["meta_info"]["prompt_tokens"] > 512
        assert o["meta_info"]["completion_tokens"] == 48
    again = generate(freekv, prompts, 48)
    assert [o["text"] for o in again] == [o["text"] for o in first]
    lines = stats_lines(freekv, mark)
    assert lines, "no freekv log line"
    busy = max(lines, key=lambda s: s["host_used"])
    # Four ~1K-token requests at page 16 occupy well over 100 host pages while they run.
    assert busy["host_used"] >= 4 * 512 // 16
    last = lines[-1]
    assert last["checks"] > 0 and last["pages_recalled"] > 0
    assert 0.0 <= last["correction_rate"] <= 1.0


def test_concurrent_requests_with_aborts_release_everything(freekv: ServerHandle) -> None:
    mark = freekv.log_mark()
    results: dict[int, object] = {}

    def run(i: int) -> None:
        words = 10 + (i * 37) % 300
        try:
            results[i] = generate(freekv, [long_prompt(i, words)], 24 + i % 16, rid=[f"req-{i}"])
        except requests.HTTPError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    for i in range(0, 32, 5):
        requests.post(f"{freekv.base_url}/abort_request", json={"rid": f"req-{i}"}, timeout=60)
    for t in threads:
        t.join(timeout=900)
    assert len(results) == 32
    finished = [
        r for r in results.values() if isinstance(r, list) and r[0]["meta_info"]["finish_reason"]
    ]
    assert len(finished) >= 32 - 7
    assert requests.get(f"{freekv.base_url}/health", timeout=60).status_code == 200
    # Every request released its host pages: once the server is idle the pool holds only the
    # pages of the prefix cache.
    deadline = time.monotonic() + 60
    idle = None
    pat = r"freekv: idle, host pool (\d+)/(\d+) pages in use \((\d+) cached prefix pages\)"
    while time.monotonic() < deadline:
        idle = re.findall(pat, freekv.log_since(mark))
        if idle and idle[-1][0] == idle[-1][2]:
            break
        time.sleep(1.0)
    assert idle and idle[-1][0] == idle[-1][2], idle


def test_retraction_with_overlap_off_resumes_and_releases(
    dense: ServerHandle, retract: ServerHandle
) -> None:
    """Requests retracted mid-decode resume and finish; within budget their greedy outputs
    equal dense SGLang's (the same tokens as never retracted); over budget they finish with
    every token (a resumed request re-prefills densely, so its FreeKV state starts afresh);
    afterwards no host page or reclaimed slot is left."""
    server = retract
    prompts = short_prompts(8)
    want = [o["text"] for o in generate(dense, prompts, 40)]
    got = [o["text"] for o in generate(server, prompts, 40)]
    assert got == want
    long_outs = generate(server, [long_prompt(s, 250) for s in range(3)], 32)
    assert all(o["meta_info"]["completion_tokens"] == 32 for o in long_outs)
    log = server.log_path.read_text(errors="replace")
    retracted = [int(n) for n in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)", log)]
    assert sum(retracted) > 0, "no retraction happened"
    deadline = time.monotonic() + 60
    while True:
        info = requests.get(f"{server.base_url}/server_info", timeout=60).json()
        state = info["internal_states"][0]["freekv"]
        if state["rows"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert state["rows"] == 0
    assert state["host_pages_used"] == state["prefix_cache_pages"]
    assert state["device_tokens_reclaimed"] == 0
    assert state["pools_consistent"] is True


def test_frontend_program_through_runtime_endpoint(
    dense: ServerHandle, freekv: ServerHandle
) -> None:
    import sglang as sgl

    @sgl.function
    def program(s, topic):  # type: ignore[no-untyped-def]
        s += "Topic: " + topic + "\nFirst:"
        s += sgl.gen("first", max_tokens=12, temperature=0)
        s += "\nSecond:"
        s += sgl.gen("second", max_tokens=12, temperature=0)
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"\nBranch {i}:"
            f += sgl.gen("branch", max_tokens=8, temperature=0)
        s += "\nJoined: " + forks[0]["branch"] + " | " + forks[1]["branch"]

    outs = {}
    for name, server in (("dense", dense), ("freekv", freekv)):
        backend = sgl.RuntimeEndpoint(server.base_url)
        state = program.run(topic="gamma delta", backend=backend)
        outs[name] = state.text()
    assert outs["freekv"] == outs["dense"]
    assert "Joined:" in outs["freekv"]


def test_engine_with_freekv_environment_matches_dense(
    dense: ServerHandle, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """``sglang.Engine`` enables FreeKV through ``FREEKV_*`` variables (see docs).

    ``Engine.shutdown`` kills every descendant of this process; the test servers are not among
    them (``testing.server.ServerProcess``), so they keep serving the modules after this one."""
    env = dict(zip(FREEKV_SERVER_ARGS[0:12:2], FREEKV_SERVER_ARGS[1:12:2], strict=True))
    for flag, value in env.items():
        name = "FREEKV_KV_OFFLOAD" if flag == "--kv-offload" else flag[2:].upper().replace("-", "_")
        monkeypatch.setenv(name, value)
    prompts = short_prompts(6)
    want = [o["text"] for o in generate(dense, prompts, 24)]
    engine = sglang.Engine(
        model_path=str(tiny_llama_path()),
        device="cpu",
        attention_backend="torch_native",
        dtype="float32",
        max_total_tokens=8192,
        log_level="info",
    )
    try:
        outs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 24})
        long_out = engine.generate(long_prompt(1, 250), {"temperature": 0, "max_new_tokens": 8})
    finally:
        engine.shutdown()
    assert [o["text"] for o in outs] == want
    assert long_out["meta_info"]["completion_tokens"] == 8
    captured = capfd.readouterr()
    assert "freekv: budget 128 tokens" in captured.out + captured.err
