"""``benchmarks/gpu_check.py``: its CPU dry run (always) and its kernel-vs-reference grid on a
GPU (``gpu`` marker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ops = {c["op"] for c in res["checks"]}
    assert ops == {
        "recall_direct", "digest_minmax", "digest_mean", "select", "correct", "select_recall",
        "correction_masks", "commit",
    }  # fmt: skip
    assert all(c["ok"] for c in res["checks"])
    assert {r["order"] for r in res["recall"]} == {"random", "sorted"}
    assert res["select"] and res["attention"]["batch"] == 2
    assert all(r["direct_GBps"] > 0 for r in res["recall"])


@pytest.mark.gpu
@pytest.mark.slow
def test_kernels_match_references_over_the_grid() -> None:
    assert gpu_check.ops.load_extension() is not None, gpu_check.ops.load_error()
    c = gpu_check.Ctx(dry=False)
    gpu_check.run_checks(c)
    failed = [x for x in c.checks if not x["ok"]]
    assert not failed, failed
    assert torch.cuda.is_available()
