"""SGLang's prefix (radix) cache under FreeKV: shared prefixes kept as host pages.

With FreeKV a request's KV lives in the host pool and most of its device slots go back to
SGLang while it decodes, so a tree of device slots cannot hold a finished request's prefix.
:class:`FreeKVPrefixCache` (registered as ``--radix-cache-backend freekv``; the plugin selects
it whenever the radix cache is on) keeps finished requests' full pages in the runtime's
:class:`~freekv_sglang.prefix_tree.HostPrefixTree` instead and serves hits through SGLang's
host-hit path (the one HiCache uses):

- ``match_prefix`` reports the cached pages as a *host* hit (``host_hit_length``, page-aligned;
  no device prefix);
- ``init_load_back`` (SGLang's admission, once it accepted the request) takes device slots from
  SGLang's allocator, copies the pages' K/V of every layer into SGLang's KV pool there
  (:meth:`~freekv_sglang.runtime.prefix.PrefixStore.load`: the recall op on the
  current stream, no host wait), and offers the pages to the runtime; the
  slots belong to the request (``load_back_is_cache_owned`` is False), which prefills only
  its suffix. With ``FREEKV_VERIFY_PAGES=1`` (:mod:`freekv_sglang.integrity`) each loaded
  page is checked against its offload checksum; a mismatch gives the slots back and the
  request recomputes its prefix;
- the runtime's row adopts the offered pages at the request's first forward (one more pool
  reference each): they are never computed or offloaded again, and recall into the request's
  budget slots reads them like the request's own pages;
- when a request finishes normally, :func:`publish` (called by the ``release_kv_cache`` hook
  before the runtime frees the row) inserts its full pages into the tree (one tree reference
  each; a request that was aborted, or whose offload or recall failed, publishes nothing): the
  pages of its prompt and of the tokens it decoded while within its budget, i.e. KV that dense
  attention computed (tokens decoded with sparse attention carry FreeKV's approximation; a
  later prompt containing them prefills them densely and shares that instead);
- SGLang's eviction (``evict``) and a host pool that runs short (the runtime) drop least
  recently used pages no request holds.

Memory accounting: the tree holds no device slot, so ``protected_size`` is 0; pages only the
tree holds count as used host pages in the allocator's host bound, and ``evictable_size`` is
what evicting them would add to SGLang's ``available_size`` (nothing while the device pool,
not the host pool, is the bound).

Everything runs on the scheduler thread (the tree and the runtime are not shared).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.base_prefix_cache import (
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InitLoadBackParams,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from freekv_sglang import runtime as rt_mod
from freekv_sglang.integrity import PageChecksumError
from freekv_sglang.prefix_tree import PageNode
from freekv_sglang.sglang import ranks
from freekv_sglang.sglang.args import FreeKVStartupError

logger = logging.getLogger(__name__)

BACKEND_NAME = "freekv"

__all__ = [
    "BACKEND_NAME",
    "FreeKVPrefixCache",
    "build_prefix_cache",
    "publish",
    "register_backend",
]


def _namespace(extra_key: Any, cache_salt: Any) -> tuple[Any, Any]:
    return (extra_key, cache_salt or None)


class FreeKVPrefixCache(RadixCache):
    """SGLang's tree-cache interface over the runtime's host prefix tree."""

    def __init__(self, params: CacheInitParams, runtime: rt_mod.FreeKVRuntime) -> None:
        self.runtime = runtime
        self.tree = runtime.prefix.enable()
        super().__init__(params)
        # Device slots loaded for each admitted request's prefix (rid -> slots), read by
        # SGLang's allocation (prefix_device_indices) and dropped when the request leaves.
        self._loaded: dict[str, torch.Tensor] = {}
        self.hit_tokens_total = 0
        self.loads_declined = 0

    # --- matching and load-back ---------------------------------------------------------------

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if self.disable or len(key) == 0:
            return self._empty_match_result
        nodes = self.tree.match(_namespace(key.extra_key, key.cache_salt), key.raw_token_ids())
        if not nodes:
            return self._empty_match_result
        hit = len(nodes) * self.tree.page_size
        return MatchResult(
            device_prefix_len=0,
            last_device_node=self.root_node,
            last_host_node=nodes[-1],
            best_match_node=nodes[-1],
            host_hit_length=hit,
            full_kv_hit_length=hit,
        )

    def touch_prefix(self, key: Any) -> None:
        if not self.disable and len(key):
            self.tree.match(_namespace(key.extra_key, key.cache_salt), key.raw_token_ids())

    def init_load_back(self, params: InitLoadBackParams) -> tuple[int, Any]:
        """Load the matched pages onto new device slots of the request (all or none)."""
        node, req = params.best_match_node, params.req
        p = self.tree.page_size
        if not isinstance(node, PageNode) or req is None or params.host_hit_length <= 0:
            return 0, self.root_node
        path = node.path()[: params.host_hit_length // p]
        n = len(path) * p
        alloc = self.token_to_kv_pool_allocator
        # The slots come out of the admission budget SGLang computed without them: take them
        # only when the device pool has them to spare, else the request recomputes its prefix.
        slots = alloc.alloc(n) if alloc.available_size() >= n else None
        if slots is None:
            self.loads_declined += 1
            return 0, self.root_node
        page_ids = [x.page_id for x in path]
        kv = alloc.get_kvcache()
        try:
            self.runtime.prefix.load(
                page_ids,
                slots,
                lambda layer: (kv.get_key_buffer(layer), kv.get_value_buffer(layer)),
            )
        except PageChecksumError as e:
            # Debug mode only: a cached page does not hold what was offloaded into it. The
            # request recomputes its prefix (correct output); the failure is counted in
            # /server_info (page_check_failures_total) for the tests that turn the mode on.
            logger.error("freekv: prefix load-back of request %s refused: %s", req.rid, e)
            alloc.free(slots)
            return 0, self.root_node
        self.runtime.prefix.offer(req.rid, page_ids)
        self._loaded[req.rid] = slots
        self.hit_tokens_total += n
        return n, path[-1]

    def load_back_is_cache_owned(self) -> bool:
        return False

    def prefix_device_indices(self, req: Any) -> torch.Tensor:
        slots = self._loaded.get(req.rid)
        if slots is None or req.prefix_len == 0:
            return self._empty_device_indices
        assert len(slots) >= req.prefix_len, (req.rid, len(slots), req.prefix_len)
        return slots[: req.prefix_len]

    def forget(self, req: Any) -> None:
        """The request left: drop its load record and any offer its row never adopted."""
        self._loaded.pop(req.rid, None)
        self.runtime.prefix.drop_offer(req.rid)

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        self.forget(req)

    def checkpoint(self, req: Any, *, up_to: int) -> None:
        """Nothing to do at SGLang's checkpoints: a finished request's pages are published by
        :func:`publish` (from the release hook, while the runtime still has its row), and the
        device slots always stay the request's (SGLang frees the whole row)."""

    # --- locks, eviction, sizes ---------------------------------------------------------------

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        if isinstance(node, PageNode):
            self.tree.lock(node)
        return IncLockRefResult(delta=0)

    def dec_lock_ref(self, node: Any, params: Any = None) -> DecLockRefResult:
        if isinstance(node, PageNode):
            self.tree.unlock(node)
        return DecLockRefResult(delta=0)

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable or params.num_tokens <= 0:
            return EvictResult()
        p = self.tree.page_size
        freed = self.tree.evict(math.ceil(params.num_tokens / p))
        return EvictResult(num_tokens_evicted=freed * p)

    def evictable_size(self) -> int:
        """What evicting would add to the allocator's ``available_size``."""
        alloc = self.token_to_kv_pool_allocator
        device_free = alloc.device_available_size()
        host_short = device_free - alloc.available_size()
        if host_short <= 0:
            return 0
        return min(self.tree.evictable_pages() * self.tree.page_size, host_short)

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return self.tree.num_pages * self.tree.page_size

    def reset(self) -> None:
        super().reset()
        if getattr(self, "tree", None) is not None:
            self.tree.clear()

    def pretty_print(self) -> None:
        print(
            f"freekv prefix cache: {self.tree.num_pages} host pages, "
            f"{self.hit_tokens_total} tokens served from it"
        )


def publish(tree_cache: Any, req: Any) -> int:
    """Insert a finished request's full pages into the prefix cache (release hook, before the
    runtime frees the row); returns the pages newly cached."""
    if not isinstance(tree_cache, FreeKVPrefixCache) or tree_cache.disable:
        return 0
    if getattr(req, "skip_radix_cache_insert", False) or not req.kv.holds_kv:
        return 0
    if isinstance(req.finished_reason, FINISH_ABORT):
        # An abort (a failed offload or recall, a client that went away, a stop mid-prefill)
        # can leave KV incomplete or still being written: share only what succeeded.
        return 0
    req.refresh_fill_ids()
    runtime = tree_cache.runtime
    # Only KV a dense computation produced is shared: the prompt (prefill is dense) and the
    # tokens decoded while the context still fit the budget. Later tokens were decoded with
    # sparse attention; a prefix built on them would differ from the same prompt prefilled.
    dense = max(len(req.origin_input_ids), runtime.cfg.total_budget_tokens)
    token_ids = req.full_untruncated_fill_ids[: min(req.owned_kv_len(), dense)]
    return runtime.publish_prefix(
        int(req.kv.req_pool_idx),
        token_ids,
        _namespace(req.extra_key, req.cache_salt),
        agree=ranks.all_ranks,
    )


def build_prefix_cache(ctx: Any) -> Any:
    """Factory registered with ``register_radix_cache_backend(BACKEND_NAME, ...)``."""
    if ctx.disable_radix_cache:
        from sglang.srt.mem_cache.registry import default_radix_cache_factory

        return default_radix_cache_factory(ctx)
    runtime = rt_mod.current()
    if runtime is None:
        raise FreeKVStartupError(
            "--radix-cache-backend freekv needs --kv-offload freekv (it keeps prefixes in "
            "FreeKV's host pool)"
        )
    cache = FreeKVPrefixCache(ctx.params, runtime)
    logger.info("freekv: prefix cache over host pages (page %d tokens)", runtime.cfg.page_size)
    return cache


def register_backend() -> None:
    """Make ``--radix-cache-backend freekv`` known to SGLang (idempotent)."""
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, build_prefix_cache)
