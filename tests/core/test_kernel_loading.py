"""The kernel-loading policy a server applies at start-up: on a CUDA device the kernels are
built (or loaded) before the first request, and a failed build stops the start-up with the
build's message unless the references were chosen explicitly; no silent fallback."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.ops import _load


def _failing_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def build() -> None:
        _load._error.append("nvcc fatal: Unsupported gpu architecture 'compute_99'")
        return None

    monkeypatch.setattr(_load, "load_extension", build)


def test_a_failed_build_on_a_cuda_device_stops_the_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FREEKV_OPS", "auto")
    _failing_build(monkeypatch)
    with pytest.raises(RuntimeError, match="compute_99") as e:
        _load.require_kernels(torch.device("cuda"))
    assert "FREEKV_OPS=reference" in str(e.value)


def test_the_references_are_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_build(monkeypatch)
    monkeypatch.setenv("FREEKV_OPS", "reference")
    assert "FREEKV_OPS=reference" in _load.require_kernels(torch.device("cuda"))
    monkeypatch.setenv("FREEKV_OPS", "auto")
    assert "no CUDA device" in _load.require_kernels(torch.device("cpu"))


def test_the_sources_are_found_in_the_package() -> None:
    root = _load.cuda_dir()
    assert root.parent.name == "freekv_sglang" and root.name == "cuda"
    assert _load._sources(root), root
