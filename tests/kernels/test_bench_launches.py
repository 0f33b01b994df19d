"""``benchmarks/bench_launches.py`` and ``benchmarks/graph_check.py --dry-run`` on the CPU: the
launch count is the same at every step and batch size, the device part reads nothing on the
host, and the CPU stand-in of a graph replay (the same op record as the capture) gives the
eager step's outputs and state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_launches, graph_check

pytestmark = pytest.mark.slow


def test_launch_count_is_reported_per_sparse_layer(tmp_path: Path) -> None:
    out = tmp_path / "launches.json"
    res = bench_launches.main(["--batches", "1,3", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    rows = res["rows"]
    assert [(r["form"], r["batch"]) for r in rows] == [
        ("paged", 1), ("paged", 3), ("graph", 1), ("graph", 3),
    ]  # fmt: skip
    # The same device work whatever the batch (the ops are batched, not per request), and in
    # the graph runner's form (every row attends through the step's one table).
    assert all(r["by_op_per_sparse_layer"] == rows[0]["by_op_per_sparse_layer"] for r in rows)
    for r in rows:
        ops = r["by_op_per_sparse_layer"]
        assert r["host_syncs_per_step"] == 0
        # Correction and speculation each select (2 kernels; the speculative one commits in its
        # second) and recall once; one correction op; one paged decode; no torch op around them.
        assert ops["freekv_ops.select_pages"] == 4 and ops["freekv_ops.recall_direct"] == 2
        assert ops["freekv_ops.correction_masks"] == 1
        assert ops["attention.paged_decode"] == 1
        assert len(ops) == 4 and r["launches_per_sparse_layer"] == 8
        assert r["launches_per_sparse_layer"] == sum(ops.values())
        assert r["host_bookkeeping_ms_per_step"] > 0


def test_graph_check_dry_run_replays_what_it_captured(tmp_path: Path) -> None:
    out = tmp_path / "graph_check.json"
    assert graph_check.main(["--dry-run", "--steps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ok"] and res["dry_run"] and res["graph_ms_per_step"] is None
    capture, *steps = res["checks"]
    assert capture["ops"] > 0 and capture["host_reads"] == []
    assert len(steps) == 2
    for row in steps:
        assert row["same_ops"] and row["outputs_equal"] and row["state_equal"]
    assert steps[1]["recalled"] > steps[0]["recalled"] > 0
