"""``benchmarks/gpu_check.py``: its CPU dry run (always) and its kernel-vs-reference grid on a
GPU (``gpu`` marker)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("freekv_gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    gc = _load()
    out = tmp_path / "dry.json"
    assert gc.main(["--dry-run", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ops = {c["op"] for c in res["checks"]}
    assert ops == {
        "recall_direct", "recall_staged", "offload_direct", "offload_staged", "digest_minmax",
        "digest_mean", "select", "correct", "page_table",
    }  # fmt: skip
    assert all(c["ok"] for c in res["checks"])
    assert {r["order"] for r in res["recall"]} == {"random", "sorted"}
    assert res["select"] and res["attention"]["batch"] == 2
    assert res["offload"]["direct_GBps"] > 0


@pytest.mark.gpu
@pytest.mark.slow
def test_kernels_match_references_over_the_grid() -> None:
    gc = _load()
    assert gc.ops.load_extension() is not None, gc.ops.load_error()
    c = gc.Ctx(dry=False)
    gc.run_checks(c)
    failed = [x for x in c.checks if not x["ok"]]
    assert not failed, failed
    assert torch.cuda.is_available()
