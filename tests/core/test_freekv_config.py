"""FreeKVConfig: derived page counts, defaults, and validation messages."""

from __future__ import annotations

import pytest

from freekv_sglang.config import FreeKVConfig, FreeKVConfigError


def test_defaults_are_the_released_budget_split() -> None:
    cfg = FreeKVConfig()
    assert (cfg.page_size, cfg.sink_tokens, cfg.window_tokens) == (32, 512, 512)
    assert cfg.num_selected_pages == 32
    assert cfg.budget_pages == 64
    assert cfg.total_budget_tokens == 2048
    assert cfg.gqa_reduction == "softmax_mean"
    assert cfg.digest_kind == "minmax"
    assert cfg.dense_layers == (0,)
    assert cfg.is_dense_layer(0) and not cfg.is_dense_layer(1)


def test_budget_meanings() -> None:
    total = FreeKVConfig(page_size=16, sink_tokens=32, window_tokens=64, budget_tokens=256)
    assert total.num_selected_pages == (256 - 32 - 64) // 16
    sel_only = FreeKVConfig(
        page_size=16,
        sink_tokens=32,
        window_tokens=64,
        budget_tokens=256,
        budget_includes_sink_window=False,
    )
    assert sel_only.num_selected_pages == 16
    assert sel_only.budget_pages == 2 + 16 + 4
    pages = FreeKVConfig(page_size=16, sink_tokens=0, window_tokens=16, selected_pages=5)
    assert pages.num_selected_pages == 5 and pages.budget_pages == 6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"page_size": 0}, "page_size"),
        ({"sink_tokens": 33}, "sink_tokens"),
        ({"window_tokens": 48}, "window_tokens"),
        ({"window_tokens": 0, "sink_tokens": 0}, "window_tokens"),
        ({"sink_tokens": -32}, "sink_tokens"),
        ({"budget_tokens": 1024}, "budget_tokens"),  # 512 + 512 leaves no selected page
        ({"budget_tokens": 2050}, "budget_tokens"),
        ({"budget_tokens": 2048, "selected_pages": 4}, "selected_pages or budget_tokens"),
        ({"selected_pages": 0}, "selected_pages"),
        ({"tau": 1.5}, "tau"),
        ({"tau": -1.01}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"dense_layers": (-1,)}, "dense_layers"),
        ({"gqa_reduction": "sum"}, "gqa_reduction"),
        ({"digest_kind": "max"}, "digest_kind"),
        ({"selection": "oracle"}, "selection"),
        ({"rerank": -1}, "rerank"),
        ({"rerank": 2, "rerank_bits": 3}, "rerank_bits"),
        ({"rerank": 2, "digest_kind": "mean"}, "rerank"),
        ({"rerank": 17}, "rerank"),  # 17 x 32 selected pages: over the kernel's 512
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(FreeKVConfigError, match=field) as info:
        FreeKVConfig(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.field == field.split(" or ")[0]
    assert str(info.value).startswith(("give either", info.value.field))


def test_errors_name_fields_as_the_caller_spells_them() -> None:
    """``describe`` renames every field the message mentions, values untouched; the error
    pickles with its field (scheduler processes report it)."""
    import pickle

    with pytest.raises(FreeKVConfigError) as info:
        FreeKVConfig(budget_tokens=1024)
    e = info.value
    assert e.field == "budget_tokens"
    names = {"budget_tokens": "B", "sink_tokens": "S", "window_tokens": "W"}
    assert e.describe(names) == "B=1024 is below S + W + one page = 1056; allowed: B >= 1056"
    assert e.describe() == str(e)
    with pytest.raises(FreeKVConfigError) as info:
        FreeKVConfig(window_tokens=40)
    assert info.value.describe({"page_size": "P"}) == (
        "window_tokens must be a whole number of pages (a multiple of P=32), got 40"
    )
    with pytest.raises(FreeKVConfigError) as info:
        FreeKVConfig(dense_layers=("{x}",))  # type: ignore[arg-type]
    assert "('{x}',)" in info.value.describe({"dense_layers": "D"})
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.field, str(back)) == (FreeKVConfigError, e.field, str(e))


def test_budget_below_sink_window_plus_one_page_says_what_is_allowed() -> None:
    with pytest.raises(FreeKVConfigError, match=r"budget_tokens >= 1056"):
        FreeKVConfig(budget_tokens=1024)
    assert FreeKVConfig(budget_tokens=1056).num_selected_pages == 1


def test_tau_bounds_and_off() -> None:
    assert FreeKVConfig(tau=None).tau is None
    assert FreeKVConfig(tau=-1.0).tau == -1.0
    assert FreeKVConfig(tau=1).tau == 1


def test_config_is_frozen_and_hashable() -> None:
    cfg = FreeKVConfig(dense_layers=[0, 1])  # type: ignore[arg-type]
    assert cfg.dense_layers == (0, 1)
    with pytest.raises(AttributeError):
        cfg.page_size = 16  # type: ignore[misc]
    assert hash(cfg) == hash(FreeKVConfig(dense_layers=(0, 1)))
