"""``make demo``'s code path, with the tiny test model: ``scripts/demo.py --model tiny``.

The script runs as a user runs it, in its own process with its own FreeKV server: a ~1K-token
document over a 128-token budget (32 sink + 4 selected pages of 16 + 32 window, no dense
layer). ``--dense expected`` leaves out the dense server (one server start instead of two on a
small CI host; the SmolLM2 run of ``make demo`` starts both). The tiny model's weights are
random, so what it answers is not checked; what is checked is that the run ends with status 0,
prints the answer and every figure, and that the figures it read from ``/server_info`` agree
with each other: the context exceeds what the device keeps, token slots were given back a page
at a time, the prompt's pages sit in the host pool, pages were recalled, and head checks were
made.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(900)]

pytest.importorskip("sglang", reason="the demo starts real SGLang servers")

ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_a_document_over_its_budget(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    args = ["--model", "tiny", "--dense", "expected", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), *args],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(out.read_text())
    budget, fk = r["budget"], r["freekv"]
    f = fk["figures"]
    assert budget == {"tokens": 128, "sink": 32, "window": 32, "page_size": 16, "dense_layers": ""}
    assert r["comparison"] == "expected answer" and "dense" not in r
    assert 900 < r["prompt_tokens"] <= 1024
    assert f["context_tokens"] == r["prompt_tokens"] + fk["completion_tokens"] - 1
    assert f["kept_tokens"] == 128 < f["context_tokens"]
    assert (f["layers"], f["sparse_layers"]) == (2, 2)
    # Slots go back a page at a time: at least every full page of the prompt but the sink and
    # window ones, never the sink's or the unfinished page's.
    full_pages = r["prompt_tokens"] // 16
    assert f["device_tokens_reclaimed"] % 16 == 0
    assert f["device_tokens_reclaimed"] >= 16 * (full_pages - (32 + 32) // 16)
    assert f["device_tokens_reclaimed"] <= 16 * (f["context_tokens"] // 16) - 32
    assert full_pages <= f["host_pages_used"] <= f["host_pages_capacity"]
    assert f["pages_recalled"] > 0 and f["mib_recalled"] > 0
    assert f["head_checks"] > 0 and 0 <= f["corrections"] <= f["head_checks"]
    assert f["correction_rate"] == pytest.approx(f["corrections"] / f["head_checks"], abs=1e-12)
    assert f["pools_consistent"] is True

    # What a user reads: the answer, the figures, and one timed line per stage.
    text = proc.stdout
    assert f"question: {r['question']}" in text
    assert f"FreeKV (--kv-offload freekv): {fk['answer']}" in text
    assert f"expected (no dense server):   {r['expected']}" in text
    assert f"context                    {f['context_tokens']:,} tokens" in text
    assert "kept on the device         128 tokens per sparse layer and KV head" in text
    assert f"pages recalled             {f['pages_recalled']:,}" in text
    assert f"correction rate            {f['correction_rate']:.3f}" in text
    stages = re.findall(r"^\[demo +\d+ s\] (.+): done in [\d.]+ s$", proc.stderr, re.M)
    assert len(stages) == 5, proc.stderr
    assert stages[1].startswith("document of 1024 tokens")
    assert stages[2] == "starting the freekv (--kv-offload freekv) server"
    assert stages[3:] == ["FreeKV answers", "stopping the server"]
