"""``sglang.Engine`` in this process, on CPU, with our plugin loaded by SGLang itself."""

from __future__ import annotations

import pytest

from freekv_sglang.testing.models import tiny_llama_path
from freekv_sglang.testing.server import engine_kwargs

pytestmark = [pytest.mark.e2e, pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.mark.parametrize("head_dim", [128])
def test_engine_generates_repeatably(head_dim):
    import sglang

    engine = sglang.Engine(**engine_kwargs(tiny_llama_path(head_dim), max_total_tokens=2048))
    try:
        params = {"temperature": 0, "max_new_tokens": 8}
        prompts = ["The garden letter", "Remember the passkey number 4242"]
        first = engine.generate(prompts, params)
        second = engine.generate(prompts, params)
    finally:
        engine.shutdown()
    assert [len(o["output_ids"]) for o in first] == [8, 8]
    assert all(o["text"] for o in first)
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in second]

    from freekv_sglang.sglang import cpu_support, hooks, lifecycle

    if cpu_support.needs_rotary_fallback():
        (row,) = [h for h in lifecycle.HOOKS if h.function is cpu_support.rotary_init_around]
        assert row.target in hooks.registered_targets()
