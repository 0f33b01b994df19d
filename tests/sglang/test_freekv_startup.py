"""Start-up through SGLang itself: the plugin's hooks attach, flags parse, bad combinations fail.

These run SGLang's real ``load_plugins()``, ``ServerArgs.add_cli_args``/``from_cli_args`` and
the argument-resolution pipeline in this process (no server is started).
"""

from __future__ import annotations

import argparse
import os

import pytest

pytest.importorskip("sglang", reason="start-up hooks target sglang")

from freekv_sglang.sglang import plugin
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.testing.models import tiny_llama_path


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.plugins import load_plugins

    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "freekv")
    load_plugins()


def test_every_registered_hook_attached(loaded: None) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    assert plugin.registered_targets()
    assert set(plugin.registered_targets()) <= HookRegistry._patched
    plugin.verify_hooks()


def test_verify_hooks_refuses_a_missing_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(plugin, "_registered", ["sglang.srt.nowhere.Missing.method"])
    monkeypatch.setattr(HookRegistry, "_patched", set())
    with pytest.raises(FreeKVStartupError, match=r"Missing\.method"):
        plugin.verify_hooks()


def test_cli_flags_reach_the_environment(loaded: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(
        ["--model-path", "m", "--kv-offload", "freekv", "--freekv-budget", "4096"]
    )
    for key, value in FreeKVSettings().to_env().items():
        monkeypatch.setenv(key, value)  # restored after the test
    monkeypatch.setenv("FREEKV_BUDGET", "1")  # replaced by the flag
    ServerArgs.from_cli_args(ns)
    assert os.environ["FREEKV_KV_OFFLOAD"] == "freekv"
    assert os.environ["FREEKV_BUDGET"] == "4096"


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm"),
        ({"page_size": 16}, "--page-size"),
    ],
)
def test_resolution_refuses_unsupported_combinations(
    loaded: None, extra: dict[str, object], flag: str
) -> None:
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(
        model_path=str(tiny_llama_path()),
        device="cpu",
        attention_backend="torch_native",
        dtype="float32",
        max_total_tokens=4096,
        **extra,
    )
    with pytest.raises(FreeKVStartupError, match=flag):
        args.resolve_once()
