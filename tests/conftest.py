"""Shared pytest set-up: fixed seeds, and the reason every GPU test skips on a host without one."""

from __future__ import annotations

import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _not_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing a command line makes this process SGLang's launcher for the plugin (a refusal
    then exits with one line); each test starts as a plain process again. Where SGLang is not
    installed (a bare GPU host running the kernel and runtime tests) there is no launcher."""
    try:
        from freekv_sglang.sglang import args as args_mod
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "sglang":
            raise
        return

    monkeypatch.setattr(args_mod, "_in_launcher", False)


@pytest.fixture(autouse=True)
def _ops_reference(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked ``ops_reference`` use the pure-torch references (``FREEKV_OPS=reference``):
    their shapes or dtypes (head dim 8, pages of 4, float32) are outside what the kernels take,
    so under ``FREEKV_OPS=emulated`` they would test the launchers' refusals instead. A test
    may still set ``FREEKV_OPS`` itself (its cases on a kernel geometry)."""
    if request.node.get_closest_marker("ops_reference") is not None:
        monkeypatch.setenv("FREEKV_OPS", "reference")
