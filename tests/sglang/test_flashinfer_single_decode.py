"""FreeKV's FlashInfer kernel set decodes dense layers with SGLang's tensor-core choice, scale
and logit soft cap, as SGLang's own decode does (FlashInfer's CUDA-core decode has kernels for
GQA group sizes 1, 2, 3, 4, 6, 8 and 16 only)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

flashinfer = pytest.importorskip("flashinfer", reason="FreeKV's FlashInfer kernels need it")

from freekv_sglang.flashinfer_kernels import FlashInferDecodeKernels  # noqa: E402


def _kernels(use_tensor_cores: bool, hq: int, h: int, d: int, device: str) -> Any:
    return FlashInferDecodeKernels(
        torch.zeros(128 << 20 if device == "cuda" else 8, dtype=torch.uint8, device=device),
        use_tensor_cores=use_tensor_cores,
        num_qo_heads=hq,
        num_kv_heads=h,
        head_dim=d,
        q_dtype=torch.bfloat16,
        kv_dtype=torch.bfloat16,
    )


def test_single_decode_keywords_are_flashinfer_s() -> None:
    params = inspect.signature(flashinfer.single_decode_with_kv_cache).parameters
    for name in ("kv_layout", "use_tensor_cores", "sm_scale", "logits_soft_cap"):
        assert name in params, name


@pytest.mark.parametrize("use_tensor_cores", [True, False])
@pytest.mark.parametrize(("logit_cap", "passed_cap"), [(0.0, None), (30.0, 30.0)])
def test_single_decode_passes_sglang_s_choices(
    monkeypatch: pytest.MonkeyPatch, use_tensor_cores: bool, logit_cap: float, passed_cap: Any
) -> None:
    calls: list[dict[str, Any]] = []

    def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls.append(kw)
        return torch.zeros_like(q)

    monkeypatch.setattr(flashinfer, "single_decode_with_kv_cache", record)
    kernels = _kernels(use_tensor_cores, 28, 4, 64, "cpu")
    q = torch.zeros(28, 64, dtype=torch.bfloat16)
    kv = torch.zeros(5, 4, 64, dtype=torch.bfloat16)
    out = kernels.single(q, kv, kv, 0.125, logit_cap)
    assert out.shape == q.shape
    assert calls == [
        {
            "kv_layout": "NHD",
            "use_tensor_cores": use_tensor_cores,
            "sm_scale": 0.125,
            "logits_soft_cap": passed_cap,
        }
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer's kernels need a GPU")
@pytest.mark.parametrize(("hq", "h"), [(28, 4), (40, 8)])
def test_single_decode_runs_gqa_groups_without_a_cuda_core_kernel(hq: int, h: int) -> None:
    """Group sizes 7 (Qwen2.5-7B) and 5 (Qwen2.5-14B/32B) on the tensor-core path, against
    plain attention."""
    g = torch.Generator().manual_seed(0)
    d, n, scale = 128, 300, 128**-0.5
    q = torch.randn(hq, d, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(n, h, d, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(n, h, d, generator=g).to("cuda", torch.bfloat16)
    out = _kernels(True, hq, h, d, "cuda").single(q, k, v, scale, 0.0)
    kk = k.float().repeat_interleave(hq // h, dim=1)
    vv = v.float().repeat_interleave(hq // h, dim=1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q.float(), kk) * scale, dim=-1)
    ref = torch.einsum("hn,nhd->hd", p, vv)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
