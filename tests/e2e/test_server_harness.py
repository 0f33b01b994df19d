"""The test-server harness itself: port choice, the fast failure on a taken port, and servers
kept out of the test process's tree.

These run without SGLang: the port checks bind sockets, and the bind-error check watches a
small real process that prints what uvicorn prints when its port is taken and then waits, as
an SGLang server does until its warm-up request times out (12 minutes in the run that made
this check necessary).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from freekv_sglang.testing.server import (
    _PORT_BAND,
    PortTakenError,
    ServerHandle,
    ServerProcess,
    _wait_healthy,
    free_port,
)


def new_log() -> Path:
    with tempfile.NamedTemporaryFile(suffix=".log", delete=False) as log:
        return Path(log.name)


def start(args: list[str], log: Path) -> ServerProcess:
    return ServerProcess.start(args, log, dict(os.environ))


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
    log = new_log()
    handle = ServerHandle("http://127.0.0.1:1", start([sys.executable, "-c", script], log), log)
    t0 = time.monotonic()
    try:
        with pytest.raises(PortTakenError, match="address already in use"):
            _wait_healthy(handle, timeout_s=60)
        assert time.monotonic() - t0 < 15
    finally:
        assert handle.stop(grace_s=5) == []


def test_server_processes_are_no_descendants_and_report_their_exit_code() -> None:
    """SGLang's ``kill_process_tree`` (run by every ``Engine.shutdown``) walks the caller's
    descendants: a server started by the harness must not be one of them."""
    psutil = pytest.importorskip("psutil", reason="psutil walks the process tree")
    log = new_log()
    proc = start([sys.executable, "-c", "import time; time.sleep(60)"], log)
    try:
        descendants = {p.pid for p in psutil.Process().children(recursive=True)}
        assert proc.poll() is None
        assert proc.pid not in descendants
        group = {p.pid for p in psutil.process_iter() if _pgid(p.pid) == proc.pid}
        assert group and not group & descendants
    finally:
        handle = ServerHandle("http://127.0.0.1:1", proc, log)
        assert handle.stop(grace_s=5) == []

    failing = start([sys.executable, "-c", "raise SystemExit(3)"], new_log())
    assert failing.wait(timeout_s=30) == 3


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1
