"""FreeKV for SGLang: KV-cache retrieval with the full KV cache in pinned host memory.

The package has three layers, and a layer never imports one above it:

- ``freekv_sglang._native`` (Rust, ``rust/freekv-py``): the host page pool and the
  layout-conversion threads;
- the engine-agnostic core (this package's top-level modules): configuration, retrieval
  (digests, scores, selection, correction, delta recall) and the ops with pure-torch references;
- ``freekv_sglang.sglang``: the only subpackage that imports SGLang; it registers the plugin.
"""

from freekv_sglang._native import __version__ as native_version
from freekv_sglang.attention import dense_attention, freekv_attention
from freekv_sglang.config import FreeKVConfig, FreeKVConfigError
from freekv_sglang.host_pool import (
    ConversionWorkers,
    FreeKVError,
    HostKVPool,
    HostPagePool,
    PageGeometry,
    Ticket,
)
from freekv_sglang.state import FreeKVState

__version__ = "0.1.0"

__all__ = [
    "ConversionWorkers",
    "FreeKVConfig",
    "FreeKVConfigError",
    "FreeKVError",
    "FreeKVState",
    "HostKVPool",
    "HostPagePool",
    "PageGeometry",
    "Ticket",
    "__version__",
    "dense_attention",
    "freekv_attention",
    "native_version",
]
