"""A short run of ``benchmarks/soak_cpu.py``: random lengths, aborts and client disconnects
against the session's shared FreeKV CPU server (``conftest.py``; the script's own server differs
only in ``--max-running-requests 16``), then zero leaks by the server's own counters and a
healthy server. The full 2,000-request run is the script itself, on its own server (see
benchmarks/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(2400)]

pytest.importorskip("sglang", reason="the soak drives a real sglang server")

from benchmarks import soak_cpu  # noqa: E402
from freekv_sglang.testing.server import ServerHandle  # noqa: E402


def test_short_soak_leaks_nothing(freekv_server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = soak_cpu.main(
        [
            "--url",
            freekv_server.base_url,
            "--pgid",
            str(freekv_server.process.pid),
            "--requests",
            "120",
            "--concurrency",
            "6",
            "--seed",
            "1",
            "--abort-fraction",
            "0.15",
            "--disconnect-fraction",
            "0.15",
            "--sample-every-s",
            "5",
            "--max-time-s",
            "1500",
            "--out",
            str(out),
        ]
    )
    assert out.is_file()
    outcomes = result["outcomes"]
    assert "error" not in outcomes, outcomes
    assert "skipped (time bound)" not in outcomes, outcomes
    assert outcomes.get("completed", 0) >= 60, outcomes
    assert outcomes.get("disconnected", 0) >= 5 and outcomes.get("aborted", 0) >= 1, outcomes
    idle = result["idle"]
    assert idle["health_status"] == 200
    assert idle["leaked_host_pages"] == 0, idle
    assert idle["rows"] == 0 and idle["budget_regions_in_use"] == 0, idle
    assert idle["sglang_loads"].get("num_used_tokens") == 0, idle
    # The sparse path ran (prompts over the 128-token budget recalled pages).
    assert idle["freekv"]["pages_recalled"] > 0 and result["peak_host_pages_used"] > 0
    assert result["meta"]["attached_to_running_server"] is True
    assert max(s["rss_kib_total"] for s in result["samples"]) > 0, "RSS of the wrong group"
