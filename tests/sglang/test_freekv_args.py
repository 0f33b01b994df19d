"""Flags, environment settings, start-up validation and hook registration of the adapter."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import pytest

from freekv_sglang import settings as fs
from freekv_sglang.sglang import args as fa
from freekv_sglang.sglang import hooks, lifecycle


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
    assert s == fa.FreeKVSettings("freekv", 256, 32, 64, 16, 0.9, (0, 1), 0.5, 2, 8)
    assert fa.settings_from_env(s.to_env()) == s
    cfg = s.retrieval_config()
    assert cfg.num_selected_pages == (256 - 32 - 64) // 16


def test_help_names_every_option() -> None:
    text = _parser().format_help()
    for row in fs.SETTINGS:
        assert row.flag in text
    assert "Default: 2048." in text and "Default: speculative." in text


# A value other than the default for every row of the table.
SAMPLES: dict[str, Any] = {
    "kv_offload": "freekv",
    "budget": 4096,
    "sink": 64,
    "window": 128,
    "page_size": 16,
    "tau": None,
    "dense_layers": (0, 2, 5),
    "host_pool_gb": 1.5,
    "conversion_threads": 3,
    "sparse_requests": 12,
    "selection": "current",
    "rerank": 4,
    "rerank_bits": 4,
}


def test_the_table_has_one_row_per_field() -> None:
    assert [r.name for r in fs.SETTINGS] == [f.name for f in fields(fs.FreeKVSettings)]
    assert set(SAMPLES) == {r.name for r in fs.SETTINGS}, "give the new row a sample value"
    for spelling in ("flag", "env", "keyword"):
        values = [getattr(r, spelling) for r in fs.SETTINGS]
        assert len(set(values)) == len(values), spelling
    assert fs.SETTINGS[1].env == "FREEKV_BUDGET" and fs.SETTINGS[1].keyword == "freekv_budget"
    assert fs.SETTINGS[0].keyword == "kv_offload"
    for row in fs.SETTINGS:
        assert getattr(fs.FreeKVSettings(), row.name) == row.default


@pytest.mark.parametrize("row", fs.SETTINGS, ids=lambda r: r.name)
def test_every_row_round_trips_through_the_environment(row: fs.Setting) -> None:
    value = SAMPLES[row.name]
    assert value != row.default
    s = fs.FreeKVSettings(**{row.name: value})
    env = s.to_env()
    assert env[row.env] == row.text(value)
    assert row.read(env[row.env]) == value
    back = fs.settings_from_env({row.env: row.text(value)})
    assert getattr(back, row.name) == value
    assert fs.settings_from_env(env) == s
    assert fs.settings_from_env(fs.FreeKVSettings().to_env()) == fs.FreeKVSettings()


@pytest.mark.parametrize("row", fs.SETTINGS, ids=lambda r: r.name)
def test_every_row_round_trips_through_argparse(row: fs.Setting) -> None:
    value = SAMPLES[row.name]
    ns = _parser().parse_args([row.flag, row.text(value)])
    assert vars(ns) == {row.keyword: value}
    s = fa.settings_from_namespace(ns, environ={})
    assert s == fs.FreeKVSettings(**{row.name: value})
    # A flag given wins over its variable; a flag left out keeps it.
    other = next(r for r in fs.SETTINGS if r is not row and r.name != "kv_offload")
    environ = {row.env: row.text(row.default), other.env: other.text(SAMPLES[other.name])}
    s = fa.settings_from_namespace(ns, environ=environ)
    assert getattr(s, row.name) == value and getattr(s, other.name) == SAMPLES[other.name]


@pytest.mark.parametrize("row", fs.SETTINGS, ids=lambda r: r.name)
def test_every_row_is_an_engine_keyword(row: fs.Setting, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in fs.FreeKVSettings().to_env():
        monkeypatch.delenv(key, raising=False)
    seen: dict[str, Any] = {}

    def original(self: object, **kwargs: object) -> None:
        seen["kwargs"] = kwargs
        seen["settings"] = fs.settings_from_env()

    fa.engine_init_around(original, object(), model_path="m", **{row.keyword: SAMPLES[row.name]})
    assert seen["kwargs"] == {"model_path": "m"}
    assert getattr(seen["settings"], row.name) == SAMPLES[row.name]
    assert row.env not in os.environ


@pytest.mark.parametrize(
    ("env", "flag", "named"),
    [
        (
            {"FREEKV_BUDGET": "64", "FREEKV_SINK": "32", "FREEKV_WINDOW": "32"},
            "--freekv-budget",
            "--freekv-budget",
        ),
        ({"FREEKV_PAGE_SIZE": "0"}, "--freekv-page-size", "--freekv-page-size"),
        ({"FREEKV_SPARSE_REQUESTS": "0"}, "--freekv-sparse-requests", "--freekv-sparse-requests"),
        ({"FREEKV_TAU": "1.5"}, "--freekv-tau", "--freekv-tau"),
        ({"FREEKV_HOST_POOL_GB": "-1"}, "--freekv-host-pool-gb", "--freekv-host-pool-gb"),
        ({"FREEKV_SELECTION": "oracle"}, "--freekv-selection", "--freekv-selection"),
        (
            {"FREEKV_CONVERSION_THREADS": "x"},
            "--freekv-conversion-threads",
            "FREEKV_CONVERSION_THREADS='x'",
        ),
    ],
)
def test_invalid_settings_name_the_flag(env: dict[str, str], flag: str, named: str) -> None:
    with pytest.raises(fa.FreeKVStartupError, match=named) as info:
        fa.settings_from_env({"FREEKV_KV_OFFLOAD": "freekv", **env})
    assert info.value.flag == flag


@pytest.mark.parametrize(
    ("values", "flag", "also_named"),
    [
        ({"budget": 100}, "--freekv-budget", "a multiple of --freekv-page-size=32"),
        ({"budget": 1024}, "--freekv-budget", "below --freekv-sink + --freekv-window"),
        ({"sink": 10}, "--freekv-sink", "--freekv-page-size=32"),
        ({"window": 0}, "--freekv-window", "at least one page (--freekv-page-size=32)"),
        ({"page_size": 0}, "--freekv-page-size", "positive integer"),
        ({"tau": 2.0}, "--freekv-tau", "[-1, 1]"),
        ({"dense_layers": (-1,)}, "--freekv-dense-layers", "non-negative layer indices"),
    ],
)
def test_config_errors_name_the_flag_of_their_field(
    values: dict[str, Any], flag: str, also_named: str
) -> None:
    """The config reports the field at fault; the table maps it (and the fields its message
    names) to flags, and the message never shows a config field name."""
    with pytest.raises(fs.FreeKVStartupError) as info:
        fs.check_settings(fs.FreeKVSettings(kv_offload="freekv", **values))
    msg = str(info.value)
    assert info.value.flag == flag and msg.startswith(f"invalid FreeKV setting: {flag}")
    assert also_named in msg, msg
    for field_name in fs.CONFIG_FLAGS:
        assert field_name not in msg.replace(flag, ""), msg
    fs.check_settings(fs.FreeKVSettings(**values))  # with "none" the config is not built


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
        ({"enable_dp_attention": True}, "--enable-dp-attention"),
        ({"attn_dp_size": 2}, "--attn-dp-size"),
        ({"attn_cp_size": 2}, "--attn-cp-size"),
        ({"dcp_size": 2}, "--dcp-size"),
        ({"enable_pdmux": True}, "--enable-pdmux"),
        ({"enable_mixed_chunk": True}, "--enable-mixed-chunk"),
        ({"page_size": 16}, "--page-size"),
        ({"attention_backend": "flashinfer"}, "--attention-backend flashinfer"),
        ({"decode_attention_backend": "triton"}, "--decode-attention-backend"),
        ({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
        ({"dllm_algorithm": "LowConfidence"}, "--dllm-algorithm LowConfidence"),
        ({"cuda_graph_backend_prefill": "full"}, "--cuda-graph-backend-prefill full"),
        ({"cuda_graph_backend_decode": "full"}, "--cuda-graph-backend-decode full on --device"),
    ],
)
def test_unsupported_combinations_are_refused(override: dict[str, object], flag: str) -> None:
    on = fa.FreeKVSettings(kv_offload="freekv")
    fa.check_server_args(SimpleNamespace(**_OK), on)
    bad = SimpleNamespace(**{**_OK, **override})
    with pytest.raises(fa.FreeKVStartupError, match=flag):
        fa.check_server_args(bad, on)
    fa.check_server_args(bad, fa.FreeKVSettings())  # "none" checks nothing


def test_decode_graphs_are_accepted_on_a_gpu_and_the_glue_graph_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On --device cuda FreeKV decodes under SGLang's graph runner; SGLang's metadata glue
    graph would capture FreeKV's host part, so its switch is refused."""
    on = fa.FreeKVSettings(kv_offload="freekv")
    gpu = {**_OK, "device": "cuda", "attention_backend": "flashinfer"}
    fa.check_server_args(SimpleNamespace(**{**gpu, "cuda_graph_backend_decode": "full"}), on)
    monkeypatch.setenv("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "1")
    with pytest.raises(fa.FreeKVStartupError, match="SGLANG_ENABLE_METADATA_GLUE_GRAPH"):
        fa.check_server_args(SimpleNamespace(**gpu), on)


def test_rerank_is_accepted_on_every_device_within_the_kernel_s_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second stage runs in the select kernel (and in the reference): accepted on a GPU,
    with the emulated kernels and on the reference ops; more than the kernel's 512 candidates
    per KV head are refused on every device, naming the flag."""
    on = fa.FreeKVSettings(kv_offload="freekv", rerank=4)
    gpu = {**_OK, "device": "cuda", "attention_backend": "flashinfer"}
    for mode in ("reference", "emulated"):
        monkeypatch.setenv("FREEKV_OPS", mode)
        fa.check_server_args(SimpleNamespace(**_OK), on)
    fa.check_server_args(SimpleNamespace(**gpu), on)
    fa.check_kernel_settings(SimpleNamespace(**gpu), on)
    assert fa.FreeKVSettings(rerank=16).retrieval_config().rerank_candidates == 512  # x 32 pages
    with pytest.raises(fa.FreeKVStartupError, match=r"--freekv-rerank x .* = 544 pages re-ranked"):
        fa.FreeKVSettings(rerank=17).retrieval_config()


def test_tensor_and_data_parallelism_are_accepted() -> None:
    on = fa.FreeKVSettings(kv_offload="freekv")
    fa.check_server_args(SimpleNamespace(**{**_OK, "tp_size": 2, "dp_size": 2}), on)


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


@pytest.mark.parametrize("offload", ["none", "freekv"])
def test_hooks_register_as_the_table_says(monkeypatch: pytest.MonkeyPatch, offload: str) -> None:
    monkeypatch.setenv("FREEKV_KV_OFFLOAD", offload)
    active = lifecycle.active_conditions()
    assert (hooks.When.FREEKV in active) == (offload == "freekv")
    reg = _Registry()
    rows = lifecycle.register(reg)
    assert rows == [h for h in lifecycle.HOOKS if h.when in active]
    assert reg.targets == [h.target for h in rows if h.kind is not hooks.Kind.RESOLUTION]
    per_step = {h.target for h in lifecycle.HOOKS if h.when is hooks.When.FREEKV}
    assert len(per_step) == 11
    assert per_step.isdisjoint(reg.targets) == (offload == "none")
    resolution = [h for h in rows if h.kind is hooks.Kind.RESOLUTION]
    assert [h.function for h in resolution] == [fa.resolution_hook]
    assert hooks.attached(resolution[0])  # SGLang's resolution list holds it (once)
    assert lifecycle.register(_Registry()) == rows


def test_every_hook_target_exists_in_sglang() -> None:
    """Each ``HookRegistry`` target resolves in the installed SGLang; each resolution step is
    one SGLang lets plugins wrap."""
    import pkgutil

    from sglang.srt.arg_groups.resolution_hooks import _OVERRIDABLE_HOOKS

    for hook in lifecycle.HOOKS:
        if hook.kind is hooks.Kind.RESOLUTION:
            assert hook.target in _OVERRIDABLE_HOOKS
        else:
            owner, name = hook.target.rsplit(".", 1)
            assert hasattr(pkgutil.resolve_name(owner), name), hook.target
    assert len({(h.target, h.kind) for h in lifecycle.HOOKS}) == len(lifecycle.HOOKS)
