"""FreeKV's memory plan on a real server: logged at start-up, what the runtime allocated matches
it, and it does not grow with SGLang's request rows.

Two CPU servers with the tiny model at its full 8K context, the same host pool and the same
number of budget regions, one with ``--max-running-requests 64`` and one with 16: FreeKV's
device state belongs to host pages and budget regions, so both allocate the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.timeout(1800)]

pytest.importorskip("sglang", reason="end-to-end tests need sglang")

from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import (  # noqa: E402
    ServerHandle,
    freekv_test_args,
    launch_server,
    launch_servers,
)

ROWS = (64, 16)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, ServerHandle]]:
    def server(rows: int):  # type: ignore[no-untyped-def]
        return launch_server(
            tiny_llama_path(),
            *freekv_test_args(dense_layers="0"),
            "--freekv-host-pool-gb",
            "0.0625",
            "--freekv-sparse-requests",
            "8",
            "--context-length",
            "8192",
            "--max-running-requests",
            str(rows),
        )

    with launch_servers({str(r): server(r) for r in ROWS}) as handles:
        yield {int(k): v for k, v in handles.items()}


def test_allocated_state_matches_the_plan_and_not_the_rows(
    servers: dict[int, ServerHandle],
) -> None:
    states = {rows: servers[rows].freekv_state() for rows in ROWS}
    for rows, state in states.items():
        planned, allocated = (
            state["memory_plan_device_bytes"],
            state["memory_device_bytes_allocated"],
        )
        assert abs(allocated - planned) <= 0.05 * planned, (rows, planned, allocated)
        assert state["budget_regions"] == 8
        assert state["memory_plan_host_bytes"] == state["host_pages_capacity"] * (
            2 * 2 * 16 * 2 * 64 * 4  # one page of the tiny model: K/V, layers, tokens, heads, dim
        )
    assert (
        states[64]["memory_device_bytes_allocated"] == states[16]["memory_device_bytes_allocated"]
    )
    assert states[64]["memory_plan_device_bytes"] == states[16]["memory_plan_device_bytes"]


def test_the_plan_is_logged_at_start_up(servers: dict[int, ServerHandle]) -> None:
    log = servers[64].log_tail(200_000)
    line = next((x for x in log.splitlines() if "freekv:" in x and "memory plan:" in x), None)
    assert line is not None, log[-3000:]
    for figure in ("digests", "residency", "budget_regions", "dense_store", "host pool"):
        assert figure in line, line
