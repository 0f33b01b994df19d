"""Start-up through SGLang itself: the plugin's hooks attach, flags parse, bad combinations fail.

These run SGLang's real ``load_plugins()``, ``ServerArgs.add_cli_args``/``from_cli_args`` and
the argument-resolution pipeline in this process (no server is started).
"""

from __future__ import annotations

import argparse
import os

import pytest

pytest.importorskip("sglang", reason="start-up hooks target sglang")

from freekv_sglang.sglang import hooks, lifecycle
from freekv_sglang.sglang.args import FreeKVSettings, FreeKVStartupError
from freekv_sglang.testing.models import tiny_llama_path


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.plugins import load_plugins

    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "freekv")
    load_plugins()


def test_every_registered_hook_attached(loaded: None) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    registered = hooks.registered_hooks()
    assert registered and set(registered) <= set(lifecycle.HOOKS)
    for hook in registered:
        assert hooks.attached(hook), hook.target
        if hook.kind is not hooks.Kind.RESOLUTION:
            assert hook.target in HookRegistry._patched
    hooks.verify_hooks()


def test_verify_hooks_refuses_a_missing_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = hooks.Hook(
        "sglang.srt.nowhere.Missing.method", hooks.Kind.AFTER, print, hooks.When.ALWAYS
    )
    monkeypatch.setattr(hooks, "_registered", [missing])
    monkeypatch.setattr(HookRegistry, "_patched", set())
    with pytest.raises(FreeKVStartupError, match=r"Missing\.method"):
        hooks.verify_hooks()
    monkeypatch.setattr(hooks, "_registered", [])
    with pytest.raises(FreeKVStartupError, match="did not register"):
        hooks.verify_hooks()


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
