"""NUMA placement of the host arena: an explicit node binds the pages there (checked in the
kernel's own accounting, ``/proc/self/numa_maps``), a node that is not online is refused with
``NumaNodeError``, the default says why it placed nothing, and ``HostKVPool`` logs one line.
On a CUDA host, a pinned pool is on its GPU's node (found here from torch's PCI ids and sysfs,
independently of the crate's ``cudaDeviceGetPCIBusId``) where the host has more than one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from freekv_sglang import _native as nat
from freekv_sglang import host_pool

NUMA_MAPS = Path("/proc/self/numa_maps")


def online_nodes() -> list[int]:
    """The host's online nodes, as sysfs lists them (``0``, ``0-1``, ``0-3,8``)."""
    path = Path("/sys/devices/system/node/online")
    if not path.exists():
        return [0]
    nodes: list[int] = []
    for part in path.read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes


def vma_policy(address: int) -> str:
    """The ``numa_maps`` line (policy and per-node page counts) of the mapping at ``address``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            for entry in NUMA_MAPS.read_text().splitlines():
                if int(entry.split()[0], 16) == lo:
                    return entry
    raise AssertionError(f"no mapping holds {address:#x}")


def geometry() -> nat.PageGeometry:
    return nat.PageGeometry(2, 2, 4, 8, "float16")


@pytest.mark.skipif(not NUMA_MAPS.exists(), reason="the kernel has no NUMA accounting")
def test_an_explicit_node_binds_the_arena_there() -> None:
    g = geometry()
    pool = nat.HostPagePool(g, 64 * g.page_bytes, pin=False, numa=0)
    assert (pool.numa_node, pool.numa_policy) == (0, "MPOL_BIND")
    assert pool.numa_placement == "requested, MPOL_BIND"
    arena = pool.arena_view()
    arena.fill_(1)  # every page touched, so each one is counted on its node
    fields = vma_policy(arena.data_ptr()).split()
    assert "bind:0" in fields, fields
    pages = 64 * g.page_bytes // 4096
    assert f"N0={pages}" in fields, fields
    buf = nat.StagingBuffer(10_000, pin=False, numa=0)
    assert (buf.numa_node, buf.numa_policy) == (0, "MPOL_BIND")
    assert "bind:0" in vma_policy(buf.view().data_ptr()).split()


def test_a_node_that_is_not_online_is_refused() -> None:
    g = geometry()
    missing = online_nodes()[-1] + 1
    with pytest.raises(nat.NumaNodeError, match=f"NUMA node {missing} is not online"):
        nat.HostPagePool(g, g.page_bytes, pin=False, numa=missing)
    with pytest.raises(nat.NumaNodeError, match="-1 is not a NUMA node number"):
        nat.StagingBuffer(4096, pin=False, numa=-1)
    with pytest.raises(ValueError, match="numa must be"):
        nat.HostPagePool(g, g.page_bytes, pin=False, numa="local")  # type: ignore[arg-type]
    assert issubclass(nat.NumaNodeError, nat.FreeKVError)
    assert issubclass(nat.NumaBindError, nat.FreeKVError)


def test_no_placement_says_why() -> None:
    g = geometry()
    pool = nat.HostPagePool(g, g.page_bytes, pin=False)
    assert (pool.numa_node, pool.numa_policy) == (None, None)
    assert pool.numa_placement == "not pinned for a CUDA device"
    pool = nat.HostPagePool(g, g.page_bytes, pin=False, numa=None)
    assert (pool.numa_node, pool.numa_placement) == (None, "not requested")


def test_host_kv_pool_logs_its_placement(caplog: pytest.LogCaptureFixture) -> None:
    g = geometry()
    caplog.set_level(logging.INFO, logger="freekv_sglang.host_pool")
    with host_pool.HostKVPool(g, 2**20, pin=False, num_threads=1, numa=0) as kv:
        mib = kv.pool.capacity_pages * g.page_bytes / 2**20
    with host_pool.HostKVPool(g, 2**20, pin=False, num_threads=1, numa=None):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "freekv_sglang.host_pool"]
    assert lines == [
        f"FreeKV host pool: {mib:.1f} MiB not pinned; NUMA node 0 (requested, MPOL_BIND)",
        f"FreeKV host pool: {mib:.1f} MiB not pinned; no NUMA placement: not requested",
    ]


@pytest.mark.gpu
def test_a_pinned_pool_is_on_its_gpus_node() -> None:
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    sysfs = Path("/sys/bus/pci/devices") / bus / "numa_node"
    node = int(sysfs.read_text()) if sysfs.exists() else -1
    g = nat.PageGeometry(4, 8, 32, 128, "bfloat16")
    pool = nat.HostPagePool(g, 64 * 2**20, device=dev)
    assert pool.is_pinned and pool.device == dev
    line = host_pool.placement_line(pool)
    if len(online_nodes()) == 1:
        assert (pool.numa_node, pool.numa_placement) == (None, "single NUMA node"), line
    elif node < 0:
        assert pool.numa_node is None and "has no NUMA affinity" in pool.numa_placement, line
    else:
        assert (pool.numa_node, pool.numa_policy) == (node, "MPOL_PREFERRED"), line
        assert pool.numa_placement == f"GPU {dev}'s node, PCI {bus}, MPOL_PREFERRED"
        # Pinning faulted every page in: all of them on the GPU's node (64 MiB fit anywhere).
        fields = vma_policy(pool.arena_view().data_ptr()).split()
        assert f"prefer:{node}" in fields, fields
        pages = pool.capacity_pages * g.page_bytes // 4096
        assert f"N{node}={pages}" in fields, fields
