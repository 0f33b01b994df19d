"""FreeKV's runtime inside one model runner (engine-agnostic: imports no SGLang)."""

from freekv_sglang.runtime.facade import (
    RECLAIMED_SLOT,
    AttendedTables,
    FaultPlan,
    FreeKVRuntime,
    RecallError,
    current,
    install,
    token_table,
)
from freekv_sglang.runtime.paged_decode import FreeKVPagedDecode

__all__ = [
    "RECLAIMED_SLOT",
    "AttendedTables",
    "FaultPlan",
    "FreeKVPagedDecode",
    "FreeKVRuntime",
    "RecallError",
    "current",
    "install",
    "token_table",
]
