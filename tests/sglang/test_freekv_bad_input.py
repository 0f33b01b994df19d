"""Bad ``--freekv-*`` values, unsupported combinations and unsupported models are refused at
start-up with one line that names the flag, before any model memory is taken.

The in-process tests go through SGLang's own argument path with the plugin loaded:
``sglang.srt.plugins.load_plugins()``, then ``sglang.srt.server_args.prepare_server_args``
(argparse with the FreeKV flags, then ``ServerArgs.from_cli_args`` whose FreeKV hook validates
the values) and ``ServerArgs.resolve_once()`` (the resolution pipeline, where the FreeKV hook
checks combinations and the model's config). Once the command line was parsed, the process is
the launcher: a refusal is one ``sglang serve: error: ...`` line on standard error and exit
status 2, as argparse's own errors. Without the command line (``sglang.Engine``, or
``ServerArgs`` built directly) the same checks raise :class:`FreeKVStartupError`. The real
launcher is run for a bad budget, non-finite and oversized host pools and a refused
combination: each exits 2 with the one line and no traceback, before model loading.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.sglang

pytest.importorskip("sglang", reason="start-up checks run through sglang's argument parsing")

from freekv_sglang import runtime as rt_mod  # noqa: E402
from freekv_sglang import settings as fs  # noqa: E402
from freekv_sglang.sglang import args as fa  # noqa: E402
from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402
from freekv_sglang.testing.server import CPU_ARGS  # noqa: E402


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugins loaded with FreeKV on; every ``FREEKV_*`` variable restored afterwards (the
    flag hook exports the flags to the environment)."""
    from sglang.srt.plugins import load_plugins

    for key, value in fa.FreeKVSettings().to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "freekv")
    load_plugins()


def refusal(capsys: pytest.CaptureFixture[str], info: pytest.ExceptionInfo[SystemExit]) -> str:
    """The one line a refusal printed (exit status 2, as argparse)."""
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _argv(model: str | Path, *extra: str) -> list[str]:
    return ["--model-path", str(model), *CPU_ARGS, "--kv-offload", "freekv", *extra]


# (extra flags, flag the message must name, a phrase of what is allowed)
BAD_VALUES = [
    (["--freekv-budget", "abc"], "--freekv-budget", "invalid int value"),
    (["--freekv-budget", "0"], "--freekv-budget", "positive integer"),
    (["--freekv-budget", "-64"], "--freekv-budget", "positive integer"),
    (["--freekv-budget", "100"], "--freekv-budget", "multiple of --freekv-page-size=32"),
    (["--freekv-budget", "1024"], "--freekv-budget", "allowed: --freekv-budget >= 1056"),
    (["--freekv-sink", "10"], "--freekv-sink", "multiple of --freekv-page-size"),
    (["--freekv-sink", "-32"], "--freekv-sink", "non-negative integer"),
    (["--freekv-sink", "1.5"], "--freekv-sink", "invalid int value"),
    (["--freekv-window", "0"], "--freekv-window", "at least one page"),
    (["--freekv-window", "40"], "--freekv-window", "multiple of --freekv-page-size"),
    (["--freekv-page-size", "0"], "--freekv-page-size", "positive integer"),
    (["--freekv-page-size", "x"], "--freekv-page-size", "invalid int value"),
    (["--freekv-tau", "1.5"], "--freekv-tau", "[-1, 1]"),
    (["--freekv-tau", "-2"], "--freekv-tau", "[-1, 1]"),
    (["--freekv-tau", "nan"], "--freekv-tau", "[-1, 1]"),
    (["--freekv-tau", "high"], "--freekv-tau", "invalid _parse_tau value"),
    (["--freekv-dense-layers", "-1"], "--freekv-dense-layers", "non-negative layer indices"),
    (["--freekv-dense-layers", "0,a"], "--freekv-dense-layers", "invalid _parse_layers value"),
    (["--freekv-host-pool-gb", "0"], "--freekv-host-pool-gb 0:", "number of GiB above 0"),
    (["--freekv-host-pool-gb", "-1"], "--freekv-host-pool-gb -1:", "number of GiB above 0"),
    (["--freekv-host-pool-gb", "nan"], "--freekv-host-pool-gb nan", "number of GiB above 0"),
    (["--freekv-host-pool-gb", "inf"], "--freekv-host-pool-gb inf", "at most this host's memory"),
    (
        ["--freekv-host-pool-gb", "1e9"],
        "--freekv-host-pool-gb 1e+09:",
        "at most this host's memory",
    ),
    (["--freekv-host-pool-gb", "lots"], "--freekv-host-pool-gb", "invalid _parse_opt_float"),
    (["--freekv-conversion-threads", "0"], "--freekv-conversion-threads", "at least 1"),
    (["--freekv-conversion-threads", "two"], "--freekv-conversion-threads", "invalid"),
    (["--freekv-selection", "oracle"], "--freekv-selection", "choose from"),
]


@pytest.mark.parametrize(
    ("extra", "flag", "allowed"), BAD_VALUES, ids=[" ".join(e) for e, _, _ in BAD_VALUES]
)
def test_bad_values_name_the_flag(
    loaded: None,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    flag: str,
    allowed: str,
) -> None:
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(SystemExit) as info:
        prepare_server_args(_argv(tiny_llama_path(), *extra))
    # argparse (a value of the wrong type) or FreeKV: one "error:" line naming the argument.
    err = refusal(capsys, info)
    assert err.startswith("sglang serve: error: ")
    assert flag in err and allowed in err, err
    assert rt_mod.current() is None


@pytest.mark.parametrize("gb", [float("nan"), float("inf"), -1.0, 0.0, 1e9])
def test_host_pool_size_checks_without_the_launcher(gb: float) -> None:
    """``sglang.Engine`` and ``FREEKV_*`` settings get the same check as an exception."""
    with pytest.raises(fa.FreeKVStartupError, match="--freekv-host-pool-gb"):
        fs.check_settings(fa.FreeKVSettings(kv_offload="freekv", host_pool_gb=gb))
    fs.check_host_pool_gb(3.0, memory_bytes=4 << 30)
    with pytest.raises(fa.FreeKVStartupError, match=r"at most this host's memory, 4\.0 GiB"):
        fs.check_host_pool_gb(5.0, memory_bytes=4 << 30)


def test_host_pool_page_slots_are_checked_against_the_model() -> None:
    """The Rust pool indexes pages with 32 bits: a pool of more pages is refused, with the
    model's page size named (here 2 layers x 2 KV heads x 64 x K/V x 16 tokens x 2 bytes)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256
    )
    page = fa.host_page_bytes(config, 16, "bfloat16")
    assert page == 2 * 2 * 64 * 2 * 16 * 2
    assert fa.host_page_bytes(config, 16, "float32") == 2 * page
    fs.check_host_pool_pages(2**32 * page / 2**30, page)
    with pytest.raises(fa.FreeKVStartupError, match=r"exceed the pool's 4294967296 page slots"):
        fs.check_host_pool_pages(2**32 * page / 2**30 + 1, page)


def test_bad_offload_mode_names_the_flag(loaded: None, capsys: pytest.CaptureFixture[str]) -> None:
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(SystemExit):
        prepare_server_args(["--model-path", str(tiny_llama_path()), "--kv-offload", "disk"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --kv-offload: invalid choice: 'disk'" in err and "freekv" in err


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"FREEKV_BUDGET": "lots"}, "FREEKV_BUDGET"),
        ({"FREEKV_TAU": "2"}, "--freekv-tau"),
        ({"FREEKV_SELECTION": "oracle"}, "--freekv-selection"),
    ],
)
def test_bad_environment_values_name_the_variable_or_flag(
    loaded: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    name: str,
) -> None:
    """Settings given as ``FREEKV_*`` variables (the ``sglang.Engine`` route) fail the same way."""
    from sglang.srt.server_args import prepare_server_args

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(fa.FreeKVStartupError) as info:
        fa.settings_from_env()
    assert name in str(info.value) and "\n" not in str(info.value)
    e = info.value  # no chained exception under it (a traceback would print both)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    with pytest.raises(SystemExit) as exit_info:
        prepare_server_args(_argv(tiny_llama_path()))
    assert refusal(capsys, exit_info) == f"sglang serve: error: {info.value}"


BAD_COMBINATIONS = [
    (["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"], "--enable-dp-attention"),
    (["--tp-size", "2", "--attn-dp-size", "2"], "--attn-dp-size"),
    (["--pp-size", "2"], "--pp-size 2"),
    (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
    (["--page-size", "16"], "--page-size 16"),
    (["--attention-backend", "triton"], "--attention-backend triton"),
    (["--decode-attention-backend", "triton"], "--decode-attention-backend triton"),
    (["--prefill-attention-backend", "triton"], "--prefill-attention-backend triton"),
    (["--attention-backend", "flashinfer"], "--attention-backend flashinfer needs a GPU"),
    (["--cuda-graph-backend-decode", "full"], "--cuda-graph-backend-decode full"),
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3"),
    (["--cuda-graph-backend-prefill", "breakable"], "--cuda-graph-backend-prefill breakable"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--speculative-algorithm", "EAGLE"], "--speculative-algorithm EAGLE"),
]


@pytest.mark.parametrize(
    ("extra", "named"), BAD_COMBINATIONS, ids=[" ".join(e) for e, _ in BAD_COMBINATIONS]
)
def test_unsupported_combinations_are_refused_in_resolution(
    loaded: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    named: str,
) -> None:
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(_argv(tiny_llama_path(), *extra))
    with pytest.raises(SystemExit) as exit_info:
        args.resolve_once()  # the launcher: one line
    line = refusal(capsys, exit_info)
    # Without the launcher's command line (sglang.Engine): the exception, same message.
    args = prepare_server_args(_argv(tiny_llama_path(), *extra))
    monkeypatch.setattr(fa, "_in_launcher", False)
    with pytest.raises(fa.FreeKVStartupError) as info:
        args.resolve_once()
    msg = str(info.value)
    assert "\n" not in msg and "--kv-offload freekv" in msg and named in msg, msg
    assert line == f"sglang serve: error: {msg}"
    assert rt_mod.current() is None


def _mla_model(folder: Path) -> Path:
    """A DeepSeek-V2-style (multi-head latent attention) config folder, without weights."""
    from transformers import DeepseekV2Config

    config = DeepseekV2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=512,
    )
    config.architectures = ["DeepseekV2ForCausalLM"]
    config.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["kv_lora_rank"] == 16
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_mla_model_is_refused_before_loading(
    loaded: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sglang.srt.server_args import prepare_server_args

    model = _mla_model(tmp_path / "mla")
    args = prepare_server_args(_argv(model, "--skip-tokenizer-init"))
    monkeypatch.setattr(fa, "_in_launcher", False)  # the Engine's view: an exception
    with pytest.raises(fa.FreeKVStartupError) as info:
        args.resolve_once()
    msg = str(info.value)
    assert "\n" not in msg
    assert f"--kv-offload freekv does not support --model-path {model}" in msg
    assert "multi-head latent attention" in msg and "grouped-query attention" in msg


def test_mla_model_is_accepted_without_freekv(loaded: None, tmp_path: Path) -> None:
    """The refusal is FreeKV's: the same config resolves with ``--kv-offload none``."""
    from sglang.srt.server_args import prepare_server_args

    model = _mla_model(tmp_path / "mla")
    argv = [a for a in _argv(model, "--skip-tokenizer-init") if a != "freekv"]
    argv[argv.index("--kv-offload") + 1 : argv.index("--kv-offload") + 1] = ["none"]
    prepare_server_args(argv).resolve_once()


def test_model_config_checks() -> None:
    from transformers import AutoConfig, LlamaConfig

    fa.check_model_config(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), "m")
    fa.check_model_config(AutoConfig.from_pretrained(tiny_llama_path()), "m")
    # A head layout FreeKV cannot group (a config object with only the fields read).
    odd = SimpleNamespace(model_type="llama", num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(fa.FreeKVStartupError, match="--model-path m: 6 query heads"):
        fa.check_model_config(odd, "m")
    mla = SimpleNamespace(model_type="custom", kv_lora_rank=512, num_attention_heads=8)
    with pytest.raises(fa.FreeKVStartupError, match="multi-head latent attention"):
        fa.check_model_config(mla, "m")


LAUNCH_REFUSALS = {
    "budget": (
        ["--freekv-budget", "100"],
        "invalid FreeKV setting: --freekv-budget must be a whole number of pages (a multiple of "
        "--freekv-page-size=32), got 100",
    ),
    "pool nan": (
        ["--freekv-host-pool-gb", "nan"],
        "--freekv-host-pool-gb nan: the host pool size must be a number of GiB above 0",
    ),
    "pool 1e9": (
        ["--freekv-host-pool-gb", "1e9"],
        "--freekv-host-pool-gb 1e+09: the host pool size must be a number of GiB above 0",
    ),
    "combination": (["--page-size", "16"], "got --page-size 16; set FreeKV's own page"),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(LAUNCH_REFUSALS))
def test_server_launch_refusal_is_one_line_with_status_2(case: str) -> None:
    """The real launcher: exit status 2, the refusal as the one line of its own on standard
    error (no traceback), no model loading."""
    extra, phrase = LAUNCH_REFUSALS[case]
    cmd = [
        sys.executable,
        "-W",
        "ignore",  # SGLang's import-time warnings about CPU-only kernels
        "-m",
        "sglang.launch_server",
        *_argv(tiny_llama_path(), *extra),
        "--port",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=840, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, out[-3000:]
    assert errors[0].startswith("sglang serve: error: ") and phrase in errors[0], errors
    for sign in ("Load weight", "Init torch distributed", "KV Cache is allocated", "freekv:"):
        assert sign not in out, sign


def test_radix_cache_runs_over_host_pages_under_freekv(loaded: None) -> None:
    """With the radix cache on, FreeKV selects its host-page prefix cache; off stays off."""
    from sglang.srt.arg_groups.overrides import resolution_result
    from sglang.srt.server_args import prepare_server_args

    # Resolution decisions are applied when SGLang publishes the config; read them back.
    args = prepare_server_args(_argv(tiny_llama_path()))
    args.resolve_once()
    assert resolution_result(args, "radix_cache_backend") == "freekv"
    assert not resolution_result(args, "disable_radix_cache", args.disable_radix_cache)
    args = prepare_server_args(_argv(tiny_llama_path(), "--disable-radix-cache"))
    args.resolve_once()
    assert resolution_result(args, "radix_cache_backend") is None


def test_attention_backend_defaults_to_the_device_s_freekv_backend(loaded: None) -> None:
    """Without --attention-backend, FreeKV picks torch_native on a CPU (SGLang's own CPU default
    is a backend FreeKV cannot drive); an explicit choice is kept."""
    from sglang.srt.arg_groups.overrides import resolution_result
    from sglang.srt.server_args import prepare_server_args

    argv = _argv(tiny_llama_path())
    i = argv.index("--attention-backend")
    args = prepare_server_args(argv[:i] + argv[i + 2 :])
    args.resolve_once()
    assert resolution_result(args, "attention_backend") == "torch_native"
    assert fa.DEFAULT_ATTENTION_BACKEND == {"cuda": "flashinfer", "cpu": "torch_native"}


def test_freekv_prefix_cache_needs_freekv(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "none")
    load_plugins()
    argv = ["--model-path", str(tiny_llama_path()), *CPU_ARGS, "--radix-cache-backend", "freekv"]
    args = prepare_server_args(argv)
    monkeypatch.setattr(fa, "_in_launcher", False)  # the Engine's view: an exception
    with pytest.raises(fa.FreeKVStartupError, match="needs --kv-offload freekv"):
        args.resolve_once()
