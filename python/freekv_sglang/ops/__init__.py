"""Ops of the GPU data path (``cuda/``), each with a pure-torch reference of the same signature.

Every wrapper dispatches to the compiled extension when its tensors are on a CUDA device and
the extension loads (`freekv_sglang.ops._load.load_extension`), else to its reference, so the
CPU path and the tests run the same interface. All ops run on the caller's current stream.
"""

from freekv_sglang.ops._load import load_error, load_extension
from freekv_sglang.ops.correct import correction_flags, correction_flags_reference
from freekv_sglang.ops.digest import page_digest, page_digest_reference
from freekv_sglang.ops.page_table import PageTable
from freekv_sglang.ops.recall import recall_direct, recall_direct_reference
from freekv_sglang.ops.select import (
    SelectOutputs,
    compute_delta_reference,
    select_pages,
    select_pages_reference,
)

__all__ = [
    "PageTable",
    "SelectOutputs",
    "compute_delta_reference",
    "correction_flags",
    "correction_flags_reference",
    "load_error",
    "load_extension",
    "page_digest",
    "page_digest_reference",
    "recall_direct",
    "recall_direct_reference",
    "select_pages",
    "select_pages_reference",
]
