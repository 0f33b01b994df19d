"""A real SGLang server on a loopback port, for tests, benchmarks and the demo.

:func:`launch_server` starts ``python -m sglang.launch_server`` in a new session (so the
launcher, its scheduler and detokenizer subprocesses share one process group) and outside the
caller's process tree (see :class:`ServerProcess`), waits until ``/health`` answers, yields a
:class:`ServerHandle`, and on exit terminates the whole group: SIGTERM, a grace period, then
SIGKILL. :meth:`ServerHandle.stop` reports any process of the group that outlived the shutdown,
so tests can assert that nothing is left behind. Tests share servers through session fixtures
(``tests/e2e/conftest.py``); :meth:`ServerHandle.log_mark` and :meth:`ServerHandle.log_since`
let a test read only what the server logged during it.

The default arguments are the ones SGLang 0.5.23 needs on a CPU-only host: ``--device cpu``,
the ``torch_native`` attention backend, float32, and a bounded ``--max-total-tokens`` (unbounded,
SGLang sizes its KV cache from host RAM). Server output goes to a log file whose tail is put in
the exception when the server fails to come up.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

CPU_ARGS: tuple[str, ...] = (
    "--device",
    "cpu",
    "--attention-backend",
    "torch_native",
    "--dtype",
    "float32",
    # An idle scheduler otherwise polls for requests without pause: with several test servers
    # side by side on a small host, each would keep a core busy.
    "--sleep-on-idle",
)


# Server ports come from a band that nothing else on the host draws from while a server starts:
# the kernel hands out outgoing and bind(0) ports from the ephemeral range (32768 and up by
# default; the gloo connections and HTTP clients of every server use it), and SGLang draws its
# own rendezvous port from 22000-29999. A port picked from either could be taken during the
# minutes a CPU server needs before it binds its HTTP port.
_PORT_BAND = (30000, 32767)
_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1, free a moment ago, from :data:`_PORT_BAND`, and never one this
    process handed out before (servers started side by side get distinct ports)."""
    low, high = _PORT_BAND
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        high = min(high, ephemeral_low - 1)
    except (OSError, ValueError, IndexError):
        pass
    with _ports_lock:
        for port in random.sample(range(low, high + 1), min(256, high - low + 1)):
            if port in _ports_handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_handed_out.add(port)
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high}")


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message holds its log tail."""


# Runs in a short-lived helper process: starts the server under ``sh`` in a new session and
# prints the shell's pid. The helper exits at once, so the shell is re-parented away from the
# caller; ``sh`` appends the server's exit status to the log when it ends on its own.
_DETACH = """
import subprocess, sys
log = open(sys.argv[1], "ab")
cmd = '"$@"; echo "[launcher] server process exited with code $?"'
p = subprocess.Popen(["sh", "-c", cmd, "sh", *sys.argv[2:]], stdin=subprocess.DEVNULL,
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
print(p.pid)
"""
_EXIT_LINE = re.compile(r"\[launcher\] server process exited with code (\d+)")


class ServerProcess:
    """A server started outside the caller's process tree.

    ``sglang.Engine.shutdown`` (SGLang's ``kill_process_tree``) kills every descendant of the
    process that made the engine; test servers started as plain children would die with any
    engine in the same pytest session. This process is the session leader ``sh`` (its pid is
    the process group of the whole server); being no child of ours, its exit status is read
    from the line the shell appends to the log (``None`` while running, -1 if it was killed
    before writing it)."""

    def __init__(self, pid: int, log_path: Path) -> None:
        self.pid = pid
        self.log_path = log_path
        self.returncode: int | None = None

    @classmethod
    def start(cls, args: list[str], log_path: Path, env: dict[str, str]) -> ServerProcess:
        out = subprocess.run(
            [sys.executable, "-c", _DETACH, str(log_path), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
        )
        return cls(int(out.stdout.strip()), log_path)

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid):
            found = _EXIT_LINE.findall(self.log_path.read_text(errors="replace"))
            self.returncode = int(found[-1]) if found else -1
        return self.returncode

    def wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.returncode


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, ...), or
    ``None`` when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


@dataclass
class ServerHandle:
    base_url: str
    process: ServerProcess
    log_path: Path
    leftovers: list[int] = field(default_factory=list)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_mark(self) -> int:
        """The log's current size, for :meth:`log_since`."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, mark: int) -> str:
        """What the server logged after :meth:`log_mark` returned ``mark``."""
        with self.log_path.open("rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def generate(self, text: str, **sampling: Any) -> dict:
        """POST /generate with greedy sampling unless overridden; returns the JSON body."""
        params = {"temperature": 0, "max_new_tokens": 16, **sampling}
        r = requests.post(
            f"{self.base_url}/generate",
            json={"text": text, "sampling_params": params},
            timeout=600,
        )
        r.raise_for_status()
        return r.json()

    def chat(self, content: str, max_tokens: int = 24, **extra: Any) -> dict:
        """POST /v1/chat/completions with one user message, greedy; returns the JSON body."""
        r = requests.post(
            f"{self.base_url}/v1/chat/completions",
            json={
                "model": "default",
                "messages": [{"role": "user", "content": content}],
                "temperature": 0,
                "max_tokens": max_tokens,
                **extra,
            },
            timeout=600,
        )
        r.raise_for_status()
        return r.json()

    def freekv_state(self) -> dict:
        """The FreeKV runtime's figures: ``/server_info`` -> ``internal_states[0]["freekv"]``."""
        r = requests.get(f"{self.base_url}/server_info", timeout=60)
        r.raise_for_status()
        return dict(r.json()["internal_states"][0]["freekv"])

    def wait_freekv_idle(self, timeout_s: float = 60.0) -> dict:
        """:meth:`freekv_state` once no request row is left (or at the deadline)."""
        deadline = time.monotonic() + timeout_s
        state = self.freekv_state()
        while state["rows"] and time.monotonic() < deadline:
            time.sleep(1.0)
            state = self.freekv_state()
        return state

    @contextlib.contextmanager
    def sampling_freekv(self, every_s: float = 0.2) -> Iterator[list[dict]]:
        """Collect :meth:`freekv_state` every ``every_s`` seconds on a thread while the block
        runs; yields the list the samples go to."""
        samples: list[dict] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                samples.append(self.freekv_state())
                done.wait(every_s)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            yield samples
        finally:
            done.set()
            t.join()

    def stop(self, grace_s: float = 30.0) -> list[int]:
        """Terminate the process group; returns the pids still alive afterwards (none is good)."""
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)
        self.process.wait(timeout_s=5)
        self.leftovers = _group_members(pgid)
        return self.leftovers


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def _group_alive(pgid: int) -> bool:
    return bool(_group_members(pgid))


def failure_of(response: requests.Response) -> str | None:
    """The error of a ``/generate`` request that failed (an HTTP error, or a 200 whose finish
    reason is an abort, as SGLang reports an abort of a running request), None when it
    completed normally."""
    if response.status_code != 200:
        return response.text
    reason = response.json()["meta_info"]["finish_reason"]
    if isinstance(reason, dict) and reason.get("type") == "abort":
        return str(reason.get("message"))
    return None


def freekv_test_args(
    *,
    budget: int = 128,
    sink: int = 32,
    window: int = 32,
    page_size: int = 16,
    dense_layers: str = "",
) -> tuple[str, ...]:
    """``--kv-offload freekv`` with a budget small enough that prompts of a few hundred tokens
    of the tiny test model exceed it (defaults: 32 sink + 4 selected pages of 16 + 32 window,
    no dense layer)."""
    return (
        "--kv-offload",
        "freekv",
        "--freekv-budget",
        str(budget),
        "--freekv-sink",
        str(sink),
        "--freekv-window",
        str(window),
        "--freekv-page-size",
        str(page_size),
        "--freekv-dense-layers",
        dense_layers,
    )


#: The shared FreeKV test server's arguments (``tests/e2e/conftest.py``), also used by modules
#: whose own servers must match it except for one flag (a reference without the radix cache,
#: retraction mode): :func:`freekv_test_args` with a decode log line every 8 steps.
FREEKV_SERVER_ARGS: tuple[str, ...] = (*freekv_test_args(), "--decode-log-interval", "8")


@contextlib.contextmanager
def launch_servers(
    managers: dict[str, contextlib.AbstractContextManager[ServerHandle]],
) -> Iterator[dict[str, ServerHandle]]:
    """Start several :func:`launch_server` managers side by side (start-up dominates the
    time), yield their handles by name, and stop every one that started. The first start-up
    error is raised once all attempts have finished."""
    handles: dict[str, ServerHandle] = {}
    errors: list[BaseException] = []

    def enter(name: str) -> None:
        try:
            handles[name] = managers[name].__enter__()
        except BaseException as e:  # reported below, after every attempt finished
            errors.append(e)

    threads = [threading.Thread(target=enter, args=(n,)) for n in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield handles
    finally:
        for name in handles:
            managers[name].__exit__(None, None, None)


@contextlib.contextmanager
def launch_server(
    model_path: str | os.PathLike[str],
    *extra_args: str,
    max_total_tokens: int = 8192,
    cpu: bool = True,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = 900.0,
) -> Iterator[ServerHandle]:
    """Start a server, wait for health, yield its handle, and always shut it down.

    A start-up that fails because its HTTP port was taken meanwhile (uvicorn logs the bind
    error and the server then waits for its warm-up to time out) is noticed in the log, stopped
    and started again on another port, up to :data:`PORT_ATTEMPTS` times."""
    proc_env = {**os.environ, **(env or {})}
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        args: list[str] = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-total-tokens",
            str(max_total_tokens),
            *(CPU_ARGS if cpu else ()),
            *extra_args,
        ]
        with tempfile.NamedTemporaryFile(
            prefix="sglang-server-", suffix=".log", delete=False
        ) as log:
            log_path = Path(log.name)
        proc = ServerProcess.start(args, log_path, proc_env)
        handle = ServerHandle(f"http://127.0.0.1:{port}", proc, log_path)
        try:
            _wait_healthy(handle, startup_timeout_s)
        except PortTakenError:
            handle.stop()
            if attempt == PORT_ATTEMPTS:
                raise
            continue
        except BaseException:
            handle.stop()
            raise
        try:
            yield handle
        finally:
            handle.stop()
        return


PORT_ATTEMPTS = 3
_BIND_ERROR = "error while attempting to bind on address"


class PortTakenError(ServerStartError):
    """Another process bound the server's HTTP port while the server was starting."""


def _wait_healthy(handle: ServerHandle, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise ServerStartError(
                f"server exited with code {handle.process.returncode}:\n{handle.log_tail()}"
            )
        if _BIND_ERROR in handle.log_tail():
            raise PortTakenError(f"{handle.base_url} was taken:\n{handle.log_tail()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{handle.base_url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise ServerStartError(f"server not healthy after {timeout_s:.0f} s:\n{handle.log_tail()}")


def engine_kwargs(
    model_path: str | os.PathLike[str], *, max_total_tokens: int = 4096, **overrides: object
) -> dict[str, object]:
    """Keyword arguments for ``sglang.Engine`` on a CPU-only host (the same choices as
    :data:`CPU_ARGS`)."""
    return {
        "model_path": str(model_path),
        "device": "cpu",
        "attention_backend": "torch_native",
        "dtype": "float32",
        "max_total_tokens": max_total_tokens,
        "log_level": "error",
        "sleep_on_idle": True,
        **overrides,
    }
