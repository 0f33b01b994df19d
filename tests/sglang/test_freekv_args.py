"""Flags, environment settings, start-up validation and hook registration of the adapter."""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import pytest

from freekv_sglang.sglang import args as fa
from freekv_sglang.sglang import lifecycle


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    fa.add_cli_args(p)
    return p


def test_flags_absent_take_environment_or_defaults() -> None:
    ns = _parser().parse_args([])
    assert not hasattr(ns, "kv_offload")
    s = fa.settings_from_namespace(ns, environ={})
    assert s == fa.FreeKVSettings()
    assert not s.enabled
    s = fa.settings_from_namespace(ns, environ={"FREEKV_KV_OFFLOAD": "freekv", "FREEKV_TAU": "off"})
    assert s.enabled and s.tau is None


def test_flags_parse_and_round_trip_through_environment() -> None:
    ns = _parser().parse_args(
        [
            "--kv-offload",
            "freekv",
            "--freekv-budget",
            "256",
            "--freekv-sink",
            "32",
            "--freekv-window",
            "64",
            "--freekv-page-size",
            "16",
            "--freekv-tau",
            "0.9",
            "--freekv-dense-layers",
            "0,1",
            "--freekv-host-pool-gb",
            "0.5",
            "--freekv-conversion-threads",
            "2",
            "--freekv-sparse-requests",
            "8",
        ]
    )
    s = fa.settings_from_namespace(ns, environ={})
    assert s == fa.FreeKVSettings(
        "freekv", 256, 32, 64, 16, 0.9, (0, 1), 0.5, 2, sparse_requests=8, recall_impl="auto"
    )
    assert fa.settings_from_env(s.to_env()) == s
    cfg = s.retrieval_config()
    assert cfg.num_selected_pages == (256 - 32 - 64) // 16


def test_help_names_every_option() -> None:
    text = _parser().format_help()
    for flag in (
        "--kv-offload",
        "--freekv-budget",
        "--freekv-tau",
        "--freekv-recall-impl",
        "--freekv-sparse-requests",
    ):
        assert flag in text


@pytest.mark.parametrize(
    ("env", "flag"),
    [
        ({"FREEKV_BUDGET": "64", "FREEKV_SINK": "32", "FREEKV_WINDOW": "32"}, "--freekv-budget"),
        ({"FREEKV_PAGE_SIZE": "0"}, "--freekv-page-size"),
        ({"FREEKV_SPARSE_REQUESTS": "0"}, "--freekv-sparse-requests"),
        ({"FREEKV_TAU": "1.5"}, "--freekv-tau"),
        ({"FREEKV_HOST_POOL_GB": "-1"}, "--freekv-host-pool-gb"),
        ({"FREEKV_RECALL_IMPL": "fast"}, "--freekv-recall-impl"),
    ],
)
def test_invalid_settings_name_the_flag(env: dict[str, str], flag: str) -> None:
    with pytest.raises(fa.FreeKVStartupError, match=flag):
        fa.settings_from_env({"FREEKV_KV_OFFLOAD": "freekv", **env})


_OK = dict(
    speculative_algorithm=None,
    pp_size=1,
    tp_size=1,
    enable_mixed_chunk=False,
    page_size=1,
    attention_backend="torch_native",
    decode_attention_backend=None,
    prefill_attention_backend=None,
    enable_hierarchical_cache=False,
)


@pytest.mark.parametrize(
    ("override", "flag"),
    [
        ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm"),
        ({"pp_size": 2}, "--pp-size"),
        ({"tp_size": 2}, "--tp-size"),
        ({"enable_mixed_chunk": True}, "--enable-mixed-chunk"),
        ({"page_size": 16}, "--page-size"),
        ({"attention_backend": "flashinfer"}, "--attention-backend flashinfer"),
        ({"decode_attention_backend": "triton"}, "--decode-attention-backend"),
        ({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
    ],
)
def test_unsupported_combinations_are_refused(override: dict[str, object], flag: str) -> None:
    on = fa.FreeKVSettings(kv_offload="freekv")
    fa.check_server_args(SimpleNamespace(**_OK), on)
    bad = SimpleNamespace(**{**_OK, **override})
    with pytest.raises(fa.FreeKVStartupError, match=flag):
        fa.check_server_args(bad, on)
    fa.check_server_args(bad, fa.FreeKVSettings())  # "none" checks nothing


def test_engine_keywords_are_exported_only_during_init(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in fa.FreeKVSettings().to_env():
        monkeypatch.delenv(k, raising=False)
    seen: dict[str, object] = {}

    def original(self: object, **kwargs: object) -> str:
        seen["kwargs"] = kwargs
        seen["env"] = fa.settings_from_env()
        return "built"

    out = fa.engine_init_around(
        original,
        object(),
        model_path="m",
        kv_offload="freekv",
        freekv_budget=256,
        freekv_sink=32,
        freekv_window=32,
    )
    assert out == "built"
    assert seen["kwargs"] == {"model_path": "m"}
    env_settings = seen["env"]
    assert isinstance(env_settings, fa.FreeKVSettings)
    assert env_settings.enabled and env_settings.budget == 256
    assert "FREEKV_KV_OFFLOAD" not in os.environ


class _Registry:
    def __init__(self) -> None:
        self.targets: list[str] = []

    def register(self, target: str, hook: object, hook_type: object) -> None:
        self.targets.append(target)


def test_per_step_hooks_register_only_with_freekv(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sglang", reason="the adapter's hooks target sglang")
    hook_type = SimpleNamespace(AFTER="after", AROUND="around", BEFORE="before")
    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "none")
    reg = _Registry()
    targets = lifecycle.register(reg, hook_type)
    assert lifecycle.RELEASE_TARGET not in targets
    assert lifecycle.BACKEND_TARGET not in targets
    assert lifecycle.ADD_CLI_TARGET in targets
    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "freekv")
    reg = _Registry()
    targets = lifecycle.register(reg, hook_type)
    for t in (
        lifecycle.RELEASE_TARGET,
        lifecycle.BACKEND_TARGET,
        lifecycle.DECODE_STATS_TARGET,
        lifecycle.INTERNAL_STATE_TARGET,
    ):
        assert t in targets and t in reg.targets
