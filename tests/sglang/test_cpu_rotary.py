"""The pure-torch rotary kernel the plugin gives SGLang on CUDA-less hosts.

It must equal SGLang's own ``RotaryEmbedding.forward_native``: both evaluate the same products
and sums in the same order on the same cached cos/sin rows, so the results are bit-identical in
every dtype (asserted with rtol=0, atol=0).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from freekv_sglang.sglang import cpu_support

pytestmark = pytest.mark.sglang


def _reference_layer(head_size: int, rotary_dim: int, is_neox: bool, dtype: torch.dtype):
    """SGLang's RotaryEmbedding, built with the plugin's construction hook where CUDA is absent."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    def build() -> RotaryEmbedding:
        return RotaryEmbedding(head_size, rotary_dim, 4096, 10000, is_neox, dtype)

    if not cpu_support.needs_rotary_fallback():
        return build()
    layer = object.__new__(RotaryEmbedding)
    cpu_support.rotary_init_around(
        lambda self, *a: RotaryEmbedding.__init__(self, *a),
        layer,
        head_size,
        rotary_dim,
        4096,
        10000,
        is_neox,
        dtype,
    )
    return layer


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("head_size", "rotary_dim", "num_heads", "num_kv_heads"),
    [(64, 64, 9, 3), (128, 128, 32, 8), (128, 64, 4, 4), (256, 256, 2, 1)],
)
def test_fallback_equals_forward_native(
    is_neox, dtype, head_size, rotary_dim, num_heads, num_kv_heads
):
    gen = torch.Generator().manual_seed(1234)
    num_tokens = 37
    layer = _reference_layer(head_size, rotary_dim, is_neox, dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen)
    query = torch.randn(num_tokens, num_heads * head_size, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads * head_size, generator=gen).to(dtype)

    want_q, want_k = layer.forward_native(positions, query.clone(), key.clone())

    got_q, got_k = query.clone(), key.clone()
    cpu_support.rotary_embedding(positions, got_q, got_k, head_size, layer.cos_sin_cache, is_neox)

    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)
    # The pass-through channels of a partial rotary are untouched.
    q_heads = got_q.view(num_tokens, num_heads, head_size)
    torch.testing.assert_close(
        q_heads[..., rotary_dim:], query.view(num_tokens, num_heads, head_size)[..., rotary_dim:]
    )


def test_fallback_accepts_missing_key_and_3d_inputs():
    gen = torch.Generator().manual_seed(7)
    layer = _reference_layer(64, 64, True, torch.float32)
    positions = torch.arange(5)
    query = torch.randn(5, 2, 64, generator=gen)
    want_q, _ = layer.forward_native(positions, query.clone(), torch.zeros(5, 64))
    got_q = query.clone()
    cpu_support.rotary_embedding(positions, got_q, None, 64, layer.cos_sin_cache, True)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)


@pytest.mark.skipif(
    not cpu_support.needs_rotary_fallback(),
    reason="the construction gap exists only on a host without CUDA and without vLLM",
)
def test_plugin_lets_sglang_build_rotary_layers_without_cuda():
    """In a fresh interpreter: without the plugin construction fails, with it the layer works."""
    script = textwrap.dedent(
        """
        import torch
        from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
        try:
            RotaryEmbedding(64, 64, 2048, 10000, True, torch.float32)
        except ModuleNotFoundError as exc:
            print("without-plugin:", exc.name)
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from freekv_sglang.sglang import cpu_support, hooks, lifecycle
        (row,) = [h for h in lifecycle.HOOKS if h.function is cpu_support.rotary_init_around]
        assert row.target in hooks.registered_targets()
        layer = RotaryEmbedding(64, 64, 2048, 10000, True, torch.float32)
        assert layer.fallback_rotary_embedding is cpu_support.rotary_embedding
        q, k = layer(torch.arange(3), torch.randn(3, 128), torch.randn(3, 64))
        print("with-plugin:", tuple(q.shape), tuple(k.shape))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert "without-plugin: vllm" in out
    assert "with-plugin: (3, 128) (3, 64)" in out
