"""`freekv_sglang.prefix_tree.HostPrefixTree` on a real host page pool: matching, sharing,
reference counts, LRU eviction that never frees a page a request holds, and a seeded random
sequence of operations checked against the pool's own invariants after every step."""

from __future__ import annotations

import random

import pytest

from freekv_sglang.host_pool import HostPagePool, PageGeometry
from freekv_sglang.prefix_tree import HostPrefixTree

P = 4


def pool(pages: int = 64) -> HostPagePool:
    g = PageGeometry(1, 1, P, 8, "float32")
    return HostPagePool(g, pages * g.page_bytes, pin=False)


def test_match_returns_whole_cached_pages_and_sharing_keeps_one_copy() -> None:
    hp = pool()
    tree = HostPrefixTree(hp, P)
    tokens = list(range(10))  # two full pages and a partial one
    pages = hp.alloc(2)
    assert tree.insert("ns", tokens, pages) == 2
    assert [hp.refcount(p) for p in pages] == [2, 2]  # the caller's and the tree's
    assert [n.page_id for n in tree.match("ns", tokens)] == pages
    assert [n.page_id for n in tree.match("ns", tokens[:7])] == pages[:1]
    assert tree.match("ns", [0, 1, 2, 9]) == []
    assert tree.match("other", tokens) == []  # namespaces never share
    # The same tokens again from another request: nothing new is cached.
    dup = hp.alloc(2)
    assert tree.insert("ns", tokens, dup) == 0
    assert [hp.refcount(p) for p in dup] == [1, 1]
    # A longer sequence through the cached pages adds only its new page.
    longer = hp.alloc(3)
    assert tree.insert("ns", [*range(8), 40, 41, 42, 43], [*pages, longer[2]]) == 1
    assert tree.num_pages == 3
    hp.release(dup + longer + pages)  # the requests leave
    tree.check()
    assert hp.used_pages == 3 and tree.evictable_pages() == 3
    assert tree.clear() == 3
    assert hp.used_pages == 0 and tree.num_pages == 0
    hp.check_invariants()


def test_insert_checks_its_arguments() -> None:
    tree = HostPrefixTree(pool(), P)
    with pytest.raises(ValueError, match="same pages"):
        tree.insert("ns", list(range(7)), [1, 2])
    with pytest.raises(ValueError, match="positive"):
        HostPrefixTree(pool(), 0)


def test_eviction_is_lru_and_skips_locked_and_held_pages() -> None:
    hp = pool()
    tree = HostPrefixTree(hp, P)
    seqs = {name: [100 * i + j for j in range(2 * P)] for i, name in enumerate("abc")}
    for name, toks in seqs.items():
        pages = hp.alloc(2)
        tree.insert(name, toks, pages)
        hp.release(pages)
    tree.match("a", seqs["a"])  # a is now the most recently used
    locked = tree.match("b", seqs["b"])[-1]
    tree.lock(locked)
    # One page wanted: c's leaf goes first (least recently used, unlocked).
    assert tree.evict(1) == 1
    assert tree.match("c", seqs["c"])[0].page_id and len(tree.match("c", seqs["c"])) == 1
    # A page a request still holds is dropped from the tree but stays allocated.
    held = tree.match("a", seqs["a"])[0].page_id
    hp.retain([held])
    freed = tree.evict(10)
    assert freed == 2  # c's first page and a's second; a's first is still held
    assert hp.refcount(held) == 1
    assert [n.page_id for n in tree.match("b", seqs["b"])] != []  # locked path survives
    tree.check()
    tree.unlock(locked)
    with pytest.raises(RuntimeError, match="without a matching lock"):
        tree.unlock(locked)
    assert tree.clear() == 2
    hp.release([held])
    assert hp.used_pages == 0
    hp.check_invariants()


def test_random_operations_keep_the_pool_consistent() -> None:
    """Requests that share prefixes come and go, the tree inserts, locks and evicts; after
    every operation the pool's invariants hold, every cached page is live, and every page a
    request holds is still allocated."""
    rng = random.Random(0)
    hp = pool(48)
    tree = HostPrefixTree(hp, P)
    prefixes = [[1000 * i + j for j in range(3 * P)] for i in range(4)]
    live: list[tuple[list[int], list[int], object]] = []  # tokens, pages, locked node
    for _ in range(400):
        op = rng.random()
        if op < 0.45 and hp.free_pages >= 6:
            base = rng.choice(prefixes)[: P * rng.randint(0, 3)]
            tokens = base + [rng.randint(0, 9) for _ in range(P * rng.randint(1, 3))]
            hit = tree.match("ns", tokens)
            node = hit[-1] if hit else None
            tree.lock(node)
            shared = [n.page_id for n in hit]
            if shared:
                hp.retain(shared)
            own = hp.alloc(len(tokens) // P - len(shared))
            live.append((tokens, shared + own, node))
        elif op < 0.8 and live:
            tokens, pages, node = live.pop(rng.randrange(len(live)))
            tree.insert("ns", tokens, pages)
            tree.unlock(node)
            hp.release(pages)
        else:
            tree.evict(rng.randint(1, 6))
        hp.check_invariants()
        tree.check()
        for _tokens, pages, _node in live:
            assert all(hp.refcount(p) >= 1 for p in pages)
    for _tokens, pages, node in live:
        tree.unlock(node)
        hp.release(pages)
    assert hp.used_pages == tree.num_pages
    tree.clear()
    assert hp.used_pages == 0
