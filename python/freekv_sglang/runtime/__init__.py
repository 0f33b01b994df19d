"""FreeKV's runtime inside one model runner; engine-agnostic (imports no SGLang).

Modules, in the order data flows through a forward (open the one that answers your question):

- :mod:`.facade`: :class:`FreeKVRuntime`, what the engine adapter calls, and the call order;
- :mod:`.rows`: what is known of each request row, and the device map of its host pages;
- :mod:`.fill`: the pages a forward fills: digests and offload, in the step or after it;
- :mod:`.offload`: full pages into the host pool (staging, conversion jobs, parked pages);
- :mod:`.regions`: budget regions, the device slots of selected pages;
- :mod:`.reclaim`: device slots of offloaded pages back to the engine; the dense-layer store;
- :mod:`.tables`: the page tables of what a decode step attends;
- :mod:`.paged_decode`: a decode batch split into dense and sparse requests, over page tables;
- :mod:`.decode`: the FreeKV step (correction, selection, recall, speculation), and
  :mod:`.checks`, its host checks (offload waits, recall faults);
- :mod:`.graph_decode`: the decode of a padded batch in fixed shapes (a CUDA graph's);
- :mod:`.prefix`: shared prefixes (publish, offer, adopt, load) and page checksums;
- :mod:`.stats`: counters and consistency checks; :mod:`.faults`: failure injection.
"""

from freekv_sglang.runtime.facade import FreeKVRuntime, current, install
from freekv_sglang.runtime.faults import FaultPlan, InvariantError, RecallError
from freekv_sglang.runtime.paged_decode import FreeKVPagedDecode
from freekv_sglang.runtime.reclaim import RECLAIMED_SLOT, TokenAllocator
from freekv_sglang.runtime.tables import attended_table, token_table

__all__ = [
    "RECLAIMED_SLOT",
    "FaultPlan",
    "FreeKVPagedDecode",
    "FreeKVRuntime",
    "InvariantError",
    "RecallError",
    "TokenAllocator",
    "attended_table",
    "current",
    "install",
    "token_table",
]
