"""The pure helpers of ``benchmarks/bench_serving_cpu.py`` and ``bench_passkey_server.py``:
grid parsing and cost order, the time-budget prediction, the decode-span statistics, the
ratios, and the passkey cases the server benchmark sends. The servers themselves are exercised
by running the scripts (see ``benchmarks/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_passkey_server as passkey_server
from benchmarks import bench_serving_cpu as serving


def test_grid_parses_and_orders_cells_by_cost() -> None:
    grid = serving.parse_grid(["tiny:2048,8192:1,4", "smollm2:4096:16", "tiny:2048:1"])
    assert grid["smollm2"] == [(4096, 16)]
    assert serving.cell_order(grid["tiny"]) == [(2048, 1), (2048, 4), (8192, 1), (8192, 4)]
    full = [(c, b) for c in (2048, 4096, 8192) for b in (1, 4, 16)]
    assert serving.cell_order(full) == [
        (2048, 1), (4096, 1), (2048, 4), (8192, 1), (4096, 4),
        (2048, 16), (8192, 4), (4096, 16), (8192, 16),
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        serving.parse_grid(["gpt:2048:1"])
    with pytest.raises(SystemExit):
        serving.parse_grid(["tiny:2048"])


def test_prediction_scales_the_dearest_measured_cell() -> None:
    assert serving.predicted_cell_s([], 8192, 16) == 0.0
    done = [(2048, 1, 10.0), (2048, 4, 30.0), (4096, 1, 12.0)]
    # Dearest by prompt tokens is (2048, 4): 30 s; (4096, 16) has 4x the batch, 4x ctx^2.
    assert serving.predicted_cell_s(done, 4096, 16) == 30.0 * 16
    assert serving.predicted_cell_s(done, 2048, 4) == 30.0


def _trace(start: float, chunks: list[tuple[float, int]]) -> object:
    t = serving.RequestTrace(start)
    t.chunks = chunks
    return t


def test_summary_counts_only_the_span_where_all_requests_decode() -> None:
    # Request a: first token at 1.0, then one token every 0.5 s; request b: first token at 2.0.
    a = _trace(0.0, [(1.0, 1), (1.5, 2), (2.0, 3), (2.5, 4), (3.0, 5)])
    b = _trace(0.5, [(2.0, 1), (2.5, 2), (3.5, 4)])  # the last chunk holds 2 tokens
    s = serving.summarize([a, b])
    # Span 2.0 .. 3.5; tokens after 2.0: a: 2 (at 2.5, 3.0), b: 1 + 2.
    assert s["decode_span_s"] == 1.5
    assert s["decode_tokens_in_span"] == 5
    assert s["decode_tokens_per_s"] == 5 / 1.5
    # Gaps that start inside the span: a 0.5, 0.5; b 0.5, then 1.0 s for 2 tokens = 0.5 twice.
    assert s["tpot_p50_ms"] == 500.0 and s["tpot_p99_ms"] == 500.0
    assert s["ttft_mean_s"] == (1.0 + 1.5) / 2
    assert s["generated_tokens"] == 9


def test_ratios_divide_freekv_by_each_baseline_of_the_same_cell() -> None:
    def row(variant: str, tps: float, p50: float, **kw: object) -> dict:
        return {"model": "tiny", "context": 2048, "batch": 4, "variant": variant,
                "decode_tokens_per_s": tps, "tpot_p50_ms": p50, **kw}  # fmt: skip

    rows = [row("dense", 8.0, 100.0), row("freekv", 2.0, 400.0), row("sync", 1.0, 1000.0)]
    (r,) = serving.ratios(rows)
    assert r["tokens_per_s_vs_dense"] == 0.25 and r["tokens_per_s_vs_sync"] == 2.0
    assert r["tpot_p50_vs_dense"] == 4.0 and r["tpot_p50_vs_sync"] == 0.4
    failed = [
        row("dense", 8.0, 100.0),
        row("freekv", 2.0, 400.0),
        {**row("sync", 0, 0), "error": "x"},
    ]
    (r,) = serving.ratios(failed)
    assert "tokens_per_s_vs_sync" not in r and r["tokens_per_s_vs_dense"] == 0.25


def test_sync_variant_uses_current_selection() -> None:
    from freekv_sglang.settings import SELECTIONS

    flags, desc = serving.sync_mode_args()
    assert flags == ["--freekv-selection", "current"] and desc == " ".join(flags)
    assert "current" in SELECTIONS  # the adapter accepts the flag's value
    a = serving.argparse.Namespace(budget=512, sink=64, window=64, page_size=32, tau=0.8,
                                   dense_layers="0")  # fmt: skip
    sync = serving.server_args("sync", a, flags)
    assert sync[-2:] == flags and "--kv-offload" in sync
    assert "--freekv-selection" not in serving.server_args("freekv", a, flags)
    dense = serving.server_args("dense", a, flags)
    assert dense[:2] == ["--kv-offload", "none"]
    assert all("--sleep-on-idle" in x for x in (dense, sync))


def test_passkey_cases_cover_depths_and_kinds_deterministically() -> None:
    from transformers import AutoTokenizer

    from freekv_sglang.testing.models import tiny_llama_path

    tok = AutoTokenizer.from_pretrained(tiny_llama_path())
    cases = passkey_server.build_cases(tok, 512, 20, seed=3)
    assert len(cases) == 20
    assert all(c.num_tokens <= 512 for c in cases)
    first, second = cases[:10], cases[10:]
    pairs = {(d, k) for d in passkey_server.DEPTHS for k in passkey_server.KINDS}
    assert {(c.depth, c.kind) for c in first} == pairs
    assert [(c.depth, c.kind) for c in first] == [(c.depth, c.kind) for c in second]
    assert [c.answer for c in first] != [c.answer for c in second]  # a new seed per round
    again = passkey_server.build_cases(tok, 512, 20, seed=3)
    assert [c.input_ids for c in again] == [c.input_ids for c in cases]


def test_json_lists_the_cells_not_measured(tmp_path: Path) -> None:
    rows = [
        {"model": "tiny", "context": 2048, "batch": 1, "variant": v,
         "decode_tokens_per_s": 2.0, "tpot_p50_ms": 1.0}
        for v in ("dense", "freekv")
    ] + [
        {"model": "tiny", "context": 2048, "batch": 1, "variant": "sync",
         "error": "server did not start: exit 1\nlog tail"},
        {"model": "smollm2", "context": 8192, "batch": 16, "variant": "dense",
         "error": "skipped: time budget (predicted 900 s)"},
        {"model": "smollm2", "context": 8192, "batch": 16, "variant": "freekv",
         "error": "skipped: time budget (predicted 900 s)"},
    ]  # fmt: skip
    out = tmp_path / "serving.json"
    meta: dict = {}
    serving.write(out, meta, rows)
    saved = json.loads(out.read_text())
    assert saved["meta"]["not_measured"] == [
        {"model": "tiny", "context": 2048, "batch": 1, "variants": ["sync"],
         "reason": "server did not start: exit 1"},
        {"model": "smollm2", "context": 8192, "batch": 16, "variants": ["dense", "freekv"],
         "reason": "skipped: time budget (predicted 900 s)"},
    ]  # fmt: skip
    assert saved["ratios"] == [
        {"model": "tiny", "context": 2048, "batch": 1, "tokens_per_s_vs_dense": 1.0,
         "tpot_p50_vs_dense": 1.0}
    ]  # fmt: skip


def test_host_pool_holds_the_largest_cell_with_a_margin() -> None:
    info = {"layers": 30, "kv_heads": 3, "head_dim": 64, "max_positions": 8192}
    # 46,080 bytes per float32 token (K and V); 2**20 tokens are 45 GiB, times 1.25, + 0.05.
    assert serving.host_pool_gb(info, 2**20) == round(1.25 * 45.0 + 0.05, 2)
    assert serving.host_pool_gb(info, 34_000) > 34_000 * 46_080 / 2**30
