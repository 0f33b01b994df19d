"""On a GPU, every value FreeKV's CUDA kernels do not take is refused at start-up, before any
weight loads, with the flag and the allowed values named (the table of
:mod:`freekv_sglang.kernel_limits`); on a CPU, where the torch references run, the kernels'
limits do not apply. The table agrees with the launchers' checks and dispatch in ``cuda/csrc``
and is the one in ``docs/sglang-integration.md``.

Refusals go through SGLang's argument parsing and resolution (``--device cuda`` resolves on a
host without a GPU; nothing is started), as in ``test_freekv_bad_input.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.sglang

pytest.importorskip("sglang", reason="start-up checks run through sglang's argument parsing")

import freekv_sglang  # noqa: E402
from freekv_sglang import kernel_limits as kl  # noqa: E402
from freekv_sglang import runtime as rt_mod  # noqa: E402
from freekv_sglang.sglang import args as fa  # noqa: E402
from freekv_sglang.testing.models import tiny_llama_path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CUDA = Path(freekv_sglang.__file__).parent / "cuda"


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.plugins import load_plugins

    for key, value in fa.FreeKVSettings().to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FREEKV_KV_OFFLOAD", "freekv")
    load_plugins()


def _config_model(folder: Path, **overrides: Any) -> Path:
    """A Llama config folder (no weights) with ``overrides``."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "dtype": "bfloat16",
    }
    fields.update(overrides)
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return folder


def _argv(model: Path, device: str, *extra: str) -> list[str]:
    backend = "flashinfer" if device == "cuda" else "torch_native"
    return [
        "--model-path",
        str(model),
        "--skip-tokenizer-init",
        "--device",
        device,
        "--attention-backend",
        backend,
        "--kv-offload",
        "freekv",
        *extra,
    ]


def _resolve(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(argv)
    monkeypatch.setattr(fa, "_in_launcher", False)  # the Engine's view: the exception
    args.resolve_once()


# (model overrides, flags, flag named, value named, allowed values named)
GPU_REFUSALS = [
    ({}, ["--dtype", "float32"], "--dtype float32", "float32", "float16, bfloat16"),
    ({}, ["--dtype", "float"], "--dtype float32", "float32", "float16, bfloat16"),
    ({"dtype": "float64"}, [], "--dtype float64", "float64", "float16, bfloat16"),
    ({}, ["--freekv-page-size", "8"], "--freekv-page-size 8", "is 8", "16, 32, 64"),
    ({}, ["--freekv-page-size", "128"], "--freekv-page-size 128", "is 128", "16, 32, 64"),
    (
        {},
        ["--freekv-budget", str(512 + 512 + 513 * 32)],
        f"--freekv-budget {512 + 512 + 513 * 32}",
        "is 513",
        "1 to 512",
    ),
    ({"head_dim": 96}, [], "--model-path", "head dimension is 96", "64, 128, 256"),
    ({"head_dim": 32}, [], "--model-path", "head dimension is 32", "64, 128, 256"),
    (
        {"num_attention_heads": 129, "num_key_value_heads": 1, "hidden_size": 258},
        [],
        "--model-path",
        "query heads per KV head) is 129",
        "1 to 128",
    ),
    ({"num_hidden_layers": 129}, [], "--model-path", "attention layers is 129", "1 to 128"),
]


@pytest.mark.parametrize(
    ("overrides", "extra", "flag", "value", "allowed"),
    GPU_REFUSALS,
    ids=[f"{o}{' '.join(e)}" for o, e, _, _, _ in GPU_REFUSALS],
)
def test_gpu_refuses_what_the_kernels_do_not_take(
    loaded: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    extra: list[str],
    flag: str,
    value: str,
    allowed: str,
) -> None:
    model = _config_model(tmp_path / "m", **overrides)
    with pytest.raises(fa.FreeKVStartupError) as info:
        _resolve(_argv(model, "cuda", *extra), monkeypatch)
    msg = str(info.value)
    assert "\n" not in msg and "on a GPU" in msg, msg
    assert flag in msg and value in msg and f"allowed: {allowed}" in msg, msg
    assert info.value.flag == flag.split()[0]
    assert rt_mod.current() is None


@pytest.mark.parametrize(
    ("overrides", "extra"),
    [(o, e) for o, e, _, _, _ in GPU_REFUSALS if o.get("dtype") != "float64"],
    ids=[f"{o}{' '.join(e)}" for o, e, _, _, _ in GPU_REFUSALS if o.get("dtype") != "float64"],
)
def test_cpu_runs_the_references_without_the_kernels_limits(
    loaded: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    extra: list[str],
) -> None:
    model = _config_model(tmp_path / "m", **overrides)
    _resolve(_argv(model, "cpu", *extra), monkeypatch)


def test_gpu_accepts_the_table_s_values(
    loaded: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _config_model(
        tmp_path / "m", head_dim=128, num_attention_heads=28, num_key_value_heads=4, hidden_size=224
    )
    budget = str(512 + 512 + 512 * 16)
    for extra in (
        ["--dtype", "bfloat16", "--freekv-page-size", "16", "--freekv-budget", budget],
        ["--dtype", "half", "--freekv-page-size", "64", "--freekv-budget", "2048"],
        ["--dtype", "auto"],
    ):
        _resolve(_argv(model, "cuda", *extra), monkeypatch)
    # A float32 config runs as float16 under --dtype auto.
    _resolve(_argv(tiny_llama_path(), "cuda", "--skip-tokenizer-init"), monkeypatch)


def test_gpu_refusal_in_the_launcher_is_one_line(
    loaded: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sglang.srt.server_args import prepare_server_args

    model = _config_model(tmp_path / "m")
    args = prepare_server_args(_argv(model, "cuda", "--freekv-page-size", "8"))
    with pytest.raises(SystemExit) as info:
        args.resolve_once()
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("sglang serve: error: --kv-offload freekv on a GPU")
    assert "--freekv-page-size 8" in line and "allowed: 16, 32, 64" in line


def test_host_pool_pages_are_checked_against_the_kernels() -> None:
    """Host pages are int32 in the kernels' work rows: a pool of 2^31 pages is refused."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=64
    )
    page = fa.host_page_bytes(config, 16, "bfloat16")
    assert page == 64 * 2 * 16 * 2
    fits = fa.FreeKVSettings(
        kv_offload="freekv", page_size=16, host_pool_gb=(2**31 - 1) * page / 2**30
    )
    fa.check_model_kernel_limits(config, "m", fits, "bfloat16")
    over = fa.FreeKVSettings(kv_offload="freekv", page_size=16, host_pool_gb=2**31 * page / 2**30)
    with pytest.raises(fa.FreeKVStartupError, match="allowed: 1 to 2147483647") as info:
        fa.check_model_kernel_limits(config, "m", over, "bfloat16")
    assert info.value.flag == "--freekv-host-pool-gb"
    assert "--freekv-host-pool-gb 8192:" in str(info.value)


def test_kv_cache_dtype_is_refused_on_every_device(
    loaded: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _config_model(tmp_path / "m")
    for device in ("cuda", "cpu"):
        with pytest.raises(fa.FreeKVStartupError, match="--kv-cache-dtype fp8_e5m2") as info:
            _resolve(_argv(model, device, "--kv-cache-dtype", "fp8_e5m2"), monkeypatch)
        assert "use auto, float16, fp16, bfloat16, bf16" in str(info.value)


def _cases(source: str, switch: str) -> tuple[int, ...]:
    """The ``case`` labels of ``switch (<switch>)`` in ``source``."""
    body = source[source.index(f"switch ({switch})") :]
    body = body[: body.index("default:")]
    return tuple(int(x) for x in re.findall(r"case (\d+):", body))


def _constant(source: str, name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", source).group(1))  # type: ignore[union-attr]


def test_table_agrees_with_the_kernels_launchers() -> None:
    checks = (CUDA / "csrc" / "checks.h").read_text()
    select = (CUDA / "include" / "freekv" / "select.cuh").read_text()
    common = (CUDA / "include" / "freekv" / "common.cuh").read_text()
    select_cu = (CUDA / "csrc" / "select.cu").read_text()
    assert _cases(checks, "head_dim") == kl.HEAD_DIM.values
    assert _cases(checks, "page_size") == kl.PAGE_SIZE.values
    assert _constant(select, "kMaxGroup") == kl.GQA_GROUP.high
    assert _constant(select, "kMaxSelect") == kl.SELECTED_PAGES.high
    assert "top_k >= 1" in select_cu and kl.SELECTED_PAGES.low == 1
    assert _constant(common, "kMaxLayers") == kl.LAYERS.high
    assert "n < (int64_t{1} << 31)" in select_cu and kl.HOST_PAGES.high == 2**31 - 1
    dispatch = checks[checks.index("void dispatch_kv_dtype") :]
    dispatch = dispatch[: dispatch.index("must be float16 or bfloat16")]
    assert re.findall(r"dt == at::k(\w+)", dispatch) == ["Half", "BFloat16"]
    assert kl.DTYPE.values == ("float16", "bfloat16")
    assert {kl.dtype_name(v) for v in kl.KV_CACHE_DTYPE.values} == {"auto", "float16", "bfloat16"}


def test_docs_carry_the_table() -> None:
    docs = (REPO / "docs" / "sglang-integration.md").read_text()
    section = docs[docs.index("## Refused at start-up") :]
    section = section[: section.index("\n## ", 1)]
    assert kl.markdown_table() in section
