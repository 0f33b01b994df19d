"""Ops of the GPU data path (``freekv_sglang/cuda``), each with a pure-torch reference of the same
signature.

Every wrapper dispatches to the compiled extension when its tensors are on a CUDA device
(`freekv_sglang.ops._load.load_extension`; an error if it cannot be built, unless
``FREEKV_OPS=reference``), to its reference for CPU tensors, so the CPU path and the tests run
the same interface. All ops run on the caller's current stream.
"""

from freekv_sglang.ops._load import load_error, load_extension, require_kernels
from freekv_sglang.ops.correct import (
    correction_flags,
    correction_flags_reference,
    correction_masks,
    correction_masks_reference,
)
from freekv_sglang.ops.digest import page_digest, page_digest_reference
from freekv_sglang.ops.page_table import PageTable
from freekv_sglang.ops.recall import (
    RECALL_CTAS_PER_SM,
    recall_ctas,
    recall_direct,
    recall_direct_reference,
)
from freekv_sglang.ops.rerank import (
    MAX_RERANK_CANDIDATES,
    RERANK_BITS,
    Rerank,
    RerankScores,
    dequantize_page_keys,
    quantize_page_keys,
    rerank_scores_reference,
)
from freekv_sglang.ops.select import (
    SelectOutputs,
    compute_delta_reference,
    select_pages,
    select_pages_reference,
)
from freekv_sglang.ops.speculate import (
    NUM_COUNTERS,
    SpeculationCommit,
    commit_speculation_reference,
)

__all__ = [
    "MAX_RERANK_CANDIDATES",
    "NUM_COUNTERS",
    "RECALL_CTAS_PER_SM",
    "RERANK_BITS",
    "PageTable",
    "Rerank",
    "RerankScores",
    "SelectOutputs",
    "SpeculationCommit",
    "commit_speculation_reference",
    "compute_delta_reference",
    "correction_flags",
    "correction_flags_reference",
    "correction_masks",
    "correction_masks_reference",
    "dequantize_page_keys",
    "load_error",
    "load_extension",
    "page_digest",
    "page_digest_reference",
    "quantize_page_keys",
    "recall_ctas",
    "recall_direct",
    "recall_direct_reference",
    "require_kernels",
    "rerank_scores_reference",
    "select_pages",
    "select_pages_reference",
]
