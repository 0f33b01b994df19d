"""The test-server harness itself: port choice and the fast failure on a taken port.

These run without SGLang: the port checks bind sockets, and the bind-error check watches a
small real process that prints what uvicorn prints when its port is taken and then waits, as
an SGLang server does until its warm-up request times out (12 minutes in the run that made
this check necessary).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from freekv_sglang.testing.server import (
    _PORT_BAND,
    PortTakenError,
    ServerHandle,
    _wait_healthy,
    free_port,
)


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert _PORT_BAND[0] <= port <= _PORT_BAND[1]
        assert port < ephemeral_low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_fails_the_start_within_seconds() -> None:
    script = (
        "import time; print('ERROR:    [Errno 98] error while attempting to bind on address "
        "(\\'127.0.0.1\\', 1): address already in use', flush=True); time.sleep(120)"
    )
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = ServerHandle("http://127.0.0.1:1", proc, Path(log.name))
    t0 = time.monotonic()
    try:
        with pytest.raises(PortTakenError, match="address already in use"):
            _wait_healthy(handle, timeout_s=60)
        assert time.monotonic() - t0 < 15
    finally:
        assert handle.stop(grace_s=5) == []
