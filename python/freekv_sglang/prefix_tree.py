"""Shared prompt prefixes as reference-counted host pages: a trie with one node per KV page.

A finished request leaves its full pages in the host pool; :class:`HostPrefixTree` keeps them
(one pool reference per page) keyed by the page's token ids, so a later
request whose prompt starts with the same pages reuses them: it takes its own reference on
each page and never computes or offloads them again. Pages are immutable once written, so
sharing needs no copy.

Keys are page-aligned: a node is one page of ``page_size`` token ids under its parent, and a
namespace (SGLang's ``extra_key`` / cache salt) has its own root, so requests of different
adapters or salts never share pages.

Eviction is LRU over leaves that no caller has locked: evicting a node drops the tree's pool
reference only, so a page a request still holds stays allocated until that request releases
it (:meth:`HostPrefixTree.check` verifies this against the pool's own reference counts).

Who calls what: the engine adapter (SGLang's scheduler thread; no other thread touches the
tree) matches prompts, inserts finished requests' pages, locks the path of a request while it
is admitted and evicts when the host pool runs short. The pool's own methods are thread-safe;
the tree itself is not and needs no lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["HostPrefixTree", "PageNode", "PagePool"]


class PagePool(Protocol):
    """What the tree needs of the host page pool (``freekv_sglang._native.HostPagePool``)."""

    def retain(self, ids: list[int]) -> None: ...
    def release(self, ids: list[int]) -> int: ...
    def refcount(self, page_id: int) -> int: ...


_tick = itertools.count()


@dataclass(eq=False)
class PageNode:
    """One shared page: its token ids and its host page (whose digests live with the page, in
    the runtime's per-host-page digest store)."""

    tokens: tuple[int, ...]
    page_id: int
    parent: PageNode | None
    children: dict[tuple[int, ...], PageNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    def path(self) -> list[PageNode]:
        """Nodes from the namespace root's first page down to this one."""
        out: list[PageNode] = []
        node: PageNode | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out


class HostPrefixTree:
    """The trie of shared host pages (see the module docstring)."""

    def __init__(self, pool: PagePool, page_size: int) -> None:
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.pool = pool
        self.page_size = page_size
        self._roots: dict[Any, PageNode] = {}
        self.num_pages = 0
        # Figures since start, for logs and metrics.
        self.hit_pages_total = 0
        self.inserted_pages_total = 0
        self.evicted_pages_total = 0

    def _root(self, namespace: Any, create: bool) -> PageNode | None:
        root = self._roots.get(namespace)
        if root is None and create:
            root = PageNode((), -1, None)
            self._roots[namespace] = root
        return root

    def _pages(self, token_ids: Sequence[int]) -> Iterator[tuple[int, ...]]:
        p = self.page_size
        for i in range(len(token_ids) // p):
            yield tuple(token_ids[i * p : (i + 1) * p])

    def match(self, namespace: Any, token_ids: Sequence[int]) -> list[PageNode]:
        """The longest run of cached pages ``token_ids`` starts with (whole pages only); marks
        them used now for LRU."""
        node = self._root(namespace, create=False)
        out: list[PageNode] = []
        if node is None:
            return out
        now = next(_tick)
        for key in self._pages(token_ids):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            out.append(child)
            node = child
        return out

    def insert(
        self,
        namespace: Any,
        token_ids: Sequence[int],
        page_ids: Sequence[int],
    ) -> int:
        """Cache the first ``len(page_ids)`` pages of ``token_ids``; returns how many were new.

        The tree takes one pool reference on each new page; a page already cached under the
        same tokens keeps the tree's existing page (the caller's copy is left to the caller).
        """
        if len(page_ids) * self.page_size > len(token_ids):
            raise ValueError(
                f"{len(page_ids)} page ids and {len(token_ids)} tokens do not describe the same "
                f"pages of {self.page_size} tokens"
            )
        node = self._root(namespace, create=True)
        assert node is not None
        now = next(_tick)
        new: list[int] = []
        for key, pid in zip(self._pages(token_ids), page_ids, strict=False):
            child = node.children.get(key)
            if child is None:
                child = PageNode(key, int(pid), node)
                node.children[key] = child
                new.append(int(pid))
            child.last_access = now
            node = child
        if new:
            self.pool.retain(new)
            self.num_pages += len(new)
            self.inserted_pages_total += len(new)
        return len(new)

    def lock(self, node: PageNode | None) -> None:
        """Protect ``node`` and its ancestors from eviction (one count per call)."""
        while node is not None and node.parent is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: PageNode | None) -> None:
        while node is not None and node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("HostPrefixTree.unlock without a matching lock")
            node.lock_ref -= 1
            node = node.parent

    def _nodes(self) -> Iterator[PageNode]:
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.parent is not None:
                yield node

    def evictable_pages(self) -> int:
        """Pages eviction would give back to the pool: unlocked and held by the tree alone."""
        return sum(
            1 for n in self._nodes() if n.lock_ref == 0 and self.pool.refcount(n.page_id) == 1
        )

    def evict(self, num_pages: int) -> int:
        """Drop least recently used unlocked leaves until ``num_pages`` pages went back to the
        pool (pages a request still holds do not count) or nothing is left to drop; returns
        the pages freed."""
        heap = [(n.last_access, id(n), n) for n in self._nodes() if not n.children]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            if node.lock_ref > 0 or node.children:
                continue
            parent = node.parent
            assert parent is not None
            del parent.children[node.tokens]
            freed += self.pool.release([node.page_id])
            self.num_pages -= 1
            self.evicted_pages_total += 1
            if parent.parent is not None and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        for ns in [ns for ns, root in self._roots.items() if not root.children]:
            del self._roots[ns]
        return freed

    def clear(self) -> int:
        """Drop every unlocked page (all of them when nothing is locked); returns pages freed."""
        return self.evict(self.num_pages + 1)

    def check(self) -> None:
        """Raise ``RuntimeError`` unless every cached page is live in the pool with the tree's
        reference counted, each page is cached once, and the page count is right."""
        seen: set[int] = set()
        count = 0
        for node in self._nodes():
            count += 1
            if node.page_id in seen:
                raise RuntimeError(f"host page {node.page_id:#x} cached twice")
            seen.add(node.page_id)
            try:
                held = self.pool.refcount(node.page_id)
            except Exception as e:  # the pool's StaleHandleError: the page was freed
                raise RuntimeError(f"cached host page {node.page_id:#x} is not live: {e}") from e
            if held < 1:
                raise RuntimeError(f"cached host page {node.page_id:#x} has no holder")
            if node.lock_ref < 0:
                raise RuntimeError("negative lock count")
        if count != self.num_pages:
            raise RuntimeError(f"{count} cached pages, counted {self.num_pages}")
