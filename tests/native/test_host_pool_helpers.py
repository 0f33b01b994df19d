"""freekv_sglang.host_pool: CUDA runtime discovery and the HostKVPool convenience layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from freekv_sglang import host_pool


def test_find_cudart_prefers_cuda13_wheel_layout(tmp_path: Path) -> None:
    cu12 = tmp_path / "a" / "nvidia" / "cuda_runtime" / "lib"
    cu13 = tmp_path / "b" / "nvidia" / "cu13" / "lib"
    for d in (cu12, cu13):
        d.mkdir(parents=True)
    (cu12 / "libcudart.so.12").write_bytes(b"")
    (cu13 / "libcudart_static.a").write_bytes(b"")
    assert host_pool.find_cudart([str(tmp_path / "a"), str(tmp_path / "b")]) == str(
        cu12 / "libcudart.so.12"
    )
    (cu13 / "libcudart.so.13").write_bytes(b"")
    assert host_pool.find_cudart([str(tmp_path / "a"), str(tmp_path / "b")]) == str(
        cu13 / "libcudart.so.13"
    )
    assert host_pool.find_cudart([str(tmp_path / "missing")]) is None


def test_configure_cudart_keeps_an_explicit_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEKV_CUDART", "custom-libcudart.so")
    assert host_pool.configure_cudart() == "custom-libcudart.so"


def test_host_kv_pool_offload_and_load() -> None:
    g = host_pool.PageGeometry(4, 2, 16, 32, "float16")
    with host_pool.HostKVPool(g, 8 * g.page_bytes, num_threads=2) as kv:
        assert kv.dtype == torch.float16
        ids = kv.pool.alloc(3)
        k = torch.randn(40, 2, 32).to(torch.float16)
        v = torch.randn(40, 2, 32).to(torch.float16)
        kv.offload_layer(3, k, v, ids).wait()
        k2, v2 = kv.load_layer(3, ids, 40)
        assert torch.equal(k2, k) and torch.equal(v2, v)
        with pytest.raises(host_pool.LayoutMismatchError):
            kv.load_layer(3, ids, 10)  # 10 tokens need one page, not three
    assert kv.workers.is_shut_down
