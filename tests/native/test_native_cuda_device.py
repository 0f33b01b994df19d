"""The binding's CUDA calls run on the pool's device: a subprocess loads a stand-in
libcudart (built here from ``rust/freekv-core/tests/fake_cudart``) through ``FREEKV_CUDART``,
drives a pinned pool, and hands back the stand-in's call log; failures it injects reach
Python as ``CudaError``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from freekv_sglang import host_pool
from tests.native.test_native_numa import online_nodes

STUB_SRC = Path(__file__).resolve().parents[2] / "rust/freekv-core/tests/fake_cudart/fake_cudart.c"

SCRIPT = r"""
import ctypes, gc, json, os, sys, threading
import torch
from freekv_sglang import host_pool
from freekv_sglang.host_pool import CudaError, HostKVPool, HostPagePool, StagingBuffer

lib = ctypes.CDLL(os.environ["FREEKV_CUDART"])
lib.fake_cudart_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
out = {"main_tid": threading.get_native_id()}
lib.fake_cudart_reset()
assert lib.cudaSetDevice(3) == 0  # the caller's device, as torch would have set it

g = host_pool.PageGeometry(2, 2, 4, 8, "float16")
kv = HostKVPool(g, 4 * g.page_bytes, num_threads=2, device=1)
out["pool"] = [kv.pool.device, kv.pool.is_pinned]
ids = kv.pool.alloc(1)
k = torch.randn(4, 2, 8).to(torch.float16)
v = torch.randn(4, 2, 8).to(torch.float16)
kv.offload_layer(0, k, v, ids, cuda_event=0x1234).wait()
lk, lv = kv.load_layer(0, ids, 4)
out["roundtrip"] = bool(torch.equal(lk, k) and torch.equal(lv, v))

lib.fake_cudart_fail(b"cudaEventSynchronize", 0, 999)
try:
    kv.offload_layer(0, k, v, ids, cuda_event=0x5678).wait()
    out["event_error"] = None
except CudaError as e:
    out["event_error"] = str(e)
out["refcount_after_failure"] = kv.pool.refcount(ids[0])

lib.fake_cudart_fail(b"cudaHostRegister", 0, 2)
try:
    HostPagePool(g, 4 * g.page_bytes, device=1)
    out["register_error"] = None
except CudaError as e:
    out["register_error"] = str(e)
lib.fake_cudart_fail(b"cudaHostRegister", 0, 2)
try:
    StagingBuffer(1000, device=2)
    out["staging_error"] = None
except CudaError as e:
    out["staging_error"] = str(e)

buf = StagingBuffer(1000, device=2)
out["staging"] = [buf.device, buf.is_pinned]
out["staging_numa"] = [buf.numa_node, buf.numa_placement]
placed = HostKVPool(g, 4 * g.page_bytes, num_threads=1, device=1, numa=0)
out["explicit"] = host_pool.placement_line(placed.pool)
placed.close()
del placed
out["default"] = host_pool.placement_line(kv.pool)
del buf
kv.pool.release(ids)
kv.close()
del kv
gc.collect()

current = ctypes.c_int(-1)
assert lib.cudaGetDevice(ctypes.byref(current)) == 0
out["caller_device"] = current.value
out["registered"] = lib.fake_cudart_registered()
size = lib.fake_cudart_log(None, 0)
text = ctypes.create_string_buffer(size + 1)
lib.fake_cudart_log(text, size + 1)
out["log"] = text.value.decode()
print(json.dumps(out))
"""


def parse(log: str) -> list[dict[str, Any]]:
    """The stand-in's log lines as dicts: name, tid, dev, arg, len, rc."""
    calls = []
    for line in log.splitlines():
        name, *fields = line.split(" ")
        call: dict[str, Any] = {"name": name}
        for f in fields:
            key, value = f.split("=", 1)
            if key == "arg":
                call[key] = int(value, 16) if value.startswith("0x") else 0
            else:
                call[key] = int(value)
        calls.append(call)
    return calls


@pytest.fixture(scope="module")
def stub_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cc = os.environ.get("CC") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libcudart")
    lib = tmp_path_factory.mktemp("fake_cudart") / "libfake_cudart.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(lib), str(STUB_SRC),
         "-lpthread"],
        check=True,
    )  # fmt: skip
    env = dict(os.environ, FREEKV_CUDART=str(lib))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_pool_and_staging_buffer_pin_on_their_device(stub_run: dict[str, object]) -> None:
    assert stub_run["pool"] == [1, True]
    assert stub_run["staging"] == [2, True]
    assert stub_run["roundtrip"] is True
    calls = parse(str(stub_run["log"]))
    regs = [c for c in calls if c["name"] in ("cudaHostRegister", "cudaHostUnregister")]
    ok = [c for c in regs if c["rc"] == 0]
    # The HostKVPool and the one placed on node 0 for device 1, the buffer for device 2.
    assert sorted(c["dev"] for c in ok if c["name"] == "cudaHostRegister") == [1, 1, 2]
    by_ptr = {c["arg"]: c["dev"] for c in ok if c["name"] == "cudaHostRegister"}
    for c in ok:
        assert c["dev"] == by_ptr[c["arg"]], c
    # The engine thread's current device is left as it was.
    assert stub_run["caller_device"] == 3


def test_event_waits_run_on_worker_threads_with_the_pool_device(
    stub_run: dict[str, object],
) -> None:
    calls = parse(str(stub_run["log"]))
    syncs = [c for c in calls if c["name"] == "cudaEventSynchronize"]
    assert [(c["arg"], c["rc"]) for c in syncs] == [(0x1234, 0), (0x5678, 999)]
    for s in syncs:
        assert s["dev"] == 1
        assert s["tid"] != stub_run["main_tid"]
        before = [c for c in calls[: calls.index(s)] if c["tid"] == s["tid"]]
        last_set = [c for c in before if c["name"] == "cudaSetDevice"][-1]
        assert (last_set["arg"], last_set["rc"]) == (1, 0)


def test_cuda_failures_raise_cuda_error_without_leaking(stub_run: dict[str, object]) -> None:
    assert "cudaEventSynchronize" in str(stub_run["event_error"])
    assert "cudaHostRegister" in str(stub_run["register_error"])
    assert "cudaHostRegister" in str(stub_run["staging_error"])
    assert stub_run["refcount_after_failure"] == 1
    calls = parse(str(stub_run["log"]))
    live: list[object] = []
    for c in calls:
        if c["rc"] != 0:
            continue
        if c["name"] == "cudaHostRegister":
            assert c["arg"] not in live
            live.append(c["arg"])
        elif c["name"] == "cudaHostUnregister":
            live.remove(c["arg"])
    assert live == []
    assert stub_run["registered"] == 0


def test_numa_placement_of_pinned_pools(stub_run: dict[str, object]) -> None:
    mib = 4 * host_pool.PageGeometry(2, 2, 4, 8, "float16").page_bytes / 2**20
    head = f"FreeKV host pool: {mib:.1f} MiB pinned for GPU 1; "
    assert stub_run["explicit"] == head + "NUMA node 0 (requested, MPOL_BIND)"
    staging = stub_run["staging_numa"]
    assert isinstance(staging, list)
    if len(online_nodes()) > 1:
        # The stand-in's PCI bus ids exist on no host: the GPU has no NUMA affinity.
        assert str(stub_run["default"]).startswith(
            head + "no NUMA placement: GPU 1 (PCI 0000:e1:1f.7) has no NUMA affinity"
        )
        assert staging[0] is None and staging[1].startswith("GPU 2 (PCI 0000:e2:1f.7)")
    else:
        assert stub_run["default"] == head + "no NUMA placement: single NUMA node"
        assert staging == [None, "single NUMA node"]
        calls = parse(str(stub_run["log"]))
        assert not [c for c in calls if c["name"] == "cudaDeviceGetPCIBusId"]


def test_host_kv_pool_device_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    g = host_pool.PageGeometry(2, 2, 4, 8, "float16")
    with host_pool.HostKVPool(g, g.page_bytes, num_threads=1) as kv:
        assert kv.pool.device == (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    with host_pool.HostKVPool(g, g.page_bytes, pin=False, num_threads=1, device=3) as kv:
        assert kv.pool.device == 3
    made: list[dict[str, object]] = []

    real_pool = host_pool.HostPagePool

    def pool(*args: object, **kwargs: object) -> host_pool.HostPagePool:
        made.append(kwargs)
        return real_pool(g, g.page_bytes, pin=False)

    monkeypatch.setattr(host_pool, "HostPagePool", pool)
    monkeypatch.setattr(host_pool, "ConversionWorkers", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    host_pool.HostKVPool(g, g.page_bytes)
    host_pool.HostKVPool(g, g.page_bytes, pin=False)
    assert [m["device"] for m in made] == [2, 0]
