"""``scripts/gpu_run.sh --dry-run``: every step of the GPU run works on the CPU with tiny sizes,
prints its record and writes the run's summary, so the first run on a borrowed GPU does not
fail on the script itself."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("build", "check", "sanitize", "tests", "bench", "graph")

pytestmark = pytest.mark.slow


def test_every_step_of_the_gpu_run_passes_its_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    run = subprocess.run(
        ["bash", "scripts/gpu_run.sh", "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((tmp_path / "freekv-gpu-run-dry" / "gpu_run.json").read_text())
    assert [row["step"] for row in summary] == list(STEPS)
    assert all(row["ok"] for row in summary), summary
    for row in summary:  # each record is printed as its step ends
        assert json.dumps(row) in run.stdout


def test_the_step_budgets_fit_one_device_command() -> None:
    """The header's budgets and the timeouts the steps run under agree, and sum to under the
    10 minutes one device command may take."""
    text = (ROOT / "scripts" / "gpu_run.sh").read_text()
    budgets = {}
    for line in text.splitlines():
        parts = line.lstrip("# ").split()
        if len(parts) >= 3 and parts[0] in STEPS and parts[1].isdigit():
            budgets[parts[0]] = int(parts[1])
    assert set(budgets) == set(STEPS)
    assert sum(budgets.values()) < 600
    for step, seconds in budgets.items():
        body = text.split(f"run_{step}() {{", 1)[1].split("\n}", 1)[0]
        assert f"timeout {seconds} " in body, step
