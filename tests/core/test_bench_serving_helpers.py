"""The pure helpers of ``benchmarks/bench_serving_cpu.py`` and ``bench_passkey_server.py``:
grid parsing and cost order, the time-budget prediction, the decode-span statistics, the
ratios, the results file that every run merges into (and what ``plot.py`` reads of it), and
the passkey cases the server benchmark sends. The servers themselves are exercised
by running the scripts (see ``benchmarks/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_passkey_server as passkey_server
from benchmarks import bench_serving_cpu as serving
from benchmarks import plot


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


def _meta(started: str, budget: int = 1024) -> dict:
    freekv = {"budget": budget, "sink": 128, "window": 128, "page_size": 32, "tau": 0.8,
              "dense_layers": "0"}  # fmt: skip
    return {"started_utc": started, "gen_tokens": 16, "freekv": freekv}


def _cell(model: str, ctx: int, batch: int, tps: float | None = None) -> list[dict]:
    """One row per variant: measured at ``tps`` tokens/s, or skipped when ``tps`` is None."""
    base = {"model": model, "context": ctx, "batch": batch}
    if tps is None:
        return [{**base, "variant": v, "error": "skipped: time budget (predicted 9 s)"}
                for v in ("dense", "freekv", "sync")]  # fmt: skip
    return [{**base, "variant": v, "decode_tokens_per_s": tps * k, "tpot_p50_ms": 10.0 / k}
            for v, k in (("dense", 1.0), ("freekv", 2.0), ("sync", 4.0))]  # fmt: skip


def _key(model: str, ctx: int, batch: int, budget: int = 1024) -> str:
    return (f"{model} context={ctx} batch={batch} gen_tokens=16 budget={budget} sink=128 "
            "window=128 page_size=32 tau=0.8 dense_layers=0")  # fmt: skip


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
    meta = _meta("2026-01-01T00:00:00Z")
    serving.write(out, meta, rows)
    saved = json.loads(out.read_text())
    assert list(saved["runs"]) == ["2026-01-01T00:00:00Z"]
    assert saved["runs"]["2026-01-01T00:00:00Z"]["not_measured"] == [
        {"model": "tiny", "context": 2048, "batch": 1, "variants": ["sync"],
         "reason": "server did not start: exit 1"},
        {"model": "smollm2", "context": 8192, "batch": 16, "variants": ["dense", "freekv"],
         "reason": "skipped: time budget (predicted 900 s)"},
    ]  # fmt: skip
    configs = saved["configurations"]
    assert list(configs) == [_key("smollm2", 8192, 16), _key("tiny", 2048, 1)]
    tiny = configs[_key("tiny", 2048, 1)]
    assert tiny["run"] == "2026-01-01T00:00:00Z" and tiny["results"] == rows[:3]
    assert tiny["ratios"] == {"model": "tiny", "context": 2048, "batch": 1,
                              "tokens_per_s_vs_dense": 1.0, "tpot_p50_vs_dense": 1.0}  # fmt: skip
    assert configs[_key("smollm2", 8192, 16)] == {"run": "2026-01-01T00:00:00Z",
                                                  "results": rows[3:]}  # fmt: skip


def test_a_run_replaces_the_cells_it_measured_and_keeps_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    a, b, c = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"
    serving.write(out, _meta(a), _cell("tiny", 2048, 1, 8.0) + _cell("tiny", 4096, 1, 6.0))
    # b measures 2048 again, skips 4096 (kept from a) and 8192 (stored: nothing was there).
    later = _cell("tiny", 2048, 1, 5.0) + _cell("tiny", 4096, 1) + _cell("tiny", 8192, 1)
    serving.write(out, _meta(b), later)
    configs = json.loads(out.read_text())["configurations"]
    assert {k: v["run"] for k, v in configs.items()} == {
        _key("tiny", 2048, 1): b, _key("tiny", 4096, 1): a, _key("tiny", 8192, 1): b,
    }  # fmt: skip
    assert configs[_key("tiny", 2048, 1)]["results"] == _cell("tiny", 2048, 1, 5.0)
    assert configs[_key("tiny", 2048, 1)]["ratios"]["tokens_per_s_vs_dense"] == 2.0
    assert configs[_key("tiny", 2048, 1)]["ratios"]["tokens_per_s_vs_sync"] == 0.5
    assert configs[_key("tiny", 4096, 1)]["results"] == _cell("tiny", 4096, 1, 6.0)
    assert "ratios" not in configs[_key("tiny", 8192, 1)]
    # c measures 4096 at another budget: a new configuration, a's cell stays.
    serving.write(out, _meta(c, budget=512), _cell("tiny", 4096, 1, 7.0))
    saved = json.loads(out.read_text())
    assert list(saved["runs"]) == [a, b, c]
    assert saved["configurations"][_key("tiny", 4096, 1, budget=512)]["run"] == c
    assert saved["configurations"][_key("tiny", 4096, 1)]["run"] == a
    # Once no cell refers to a run, the run is dropped.
    serving.write(out, _meta("2026-01-04T00:00:00Z"), _cell("tiny", 4096, 1, 9.0))
    assert list(json.loads(out.read_text())["runs"]) == [b, c, "2026-01-04T00:00:00Z"]


def test_results_of_another_format_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    out.write_text(json.dumps({"meta": {}, "results": [], "ratios": []}))
    with pytest.raises(SystemExit, match="not a results file"):
        serving.write(out, _meta("2026-01-01T00:00:00Z"), _cell("tiny", 2048, 1, 8.0))
    with pytest.raises(SystemExit, match="not a results file"):
        serving.main(["--out", str(out)])


def test_plot_takes_one_row_per_cell_the_latest_run_first(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    serving.write(out, _meta("2026-01-02T00:00:00Z"), _cell("tiny", 2048, 1, 8.0))
    serving.write(out, _meta("2026-01-01T00:00:00Z", budget=512), _cell("tiny", 2048, 1, 3.0))
    rows = plot.serving_rows(json.loads(out.read_text()))
    assert sorted((r["variant"], r["decode_tokens_per_s"]) for r in rows) == [
        ("dense", 8.0), ("freekv", 16.0), ("sync", 32.0)
    ]  # fmt: skip


def test_the_committed_results_are_keyed_by_their_runs_settings() -> None:
    doc = serving.load_results(serving.ROOT / "benchmarks/results/serving_cpu.json")
    assert set(doc["runs"]) == {c["run"] for c in doc["configurations"].values()}
    assert len(doc["configurations"]) == 18  # 2K-8K x 1/4/16 on both models
    for key, cell in doc["configurations"].items():
        meta, rows = doc["runs"][cell["run"]], cell["results"]
        (model, ctx, batch), *others = {(r["model"], r["context"], r["batch"]) for r in rows}
        assert not others
        assert key == serving.config_key(model, ctx, batch, meta)
        assert sorted(r["variant"] for r in rows) == sorted(meta["variants"])
        assert [cell["ratios"]] == serving.ratios(rows)


def test_host_pool_holds_the_largest_cell_with_a_margin() -> None:
    info = {"layers": 30, "kv_heads": 3, "head_dim": 64, "max_positions": 8192}
    # 46,080 bytes per float32 token (K and V); 2**20 tokens are 45 GiB, times 1.25, + 0.05.
    assert serving.host_pool_gb(info, 2**20) == round(1.25 * 45.0 + 0.05, 2)
    assert serving.host_pool_gb(info, 34_000) > 34_000 * 46_080 / 2**30
