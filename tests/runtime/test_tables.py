"""`runtime.tables.pick_rows`: the graph form's one table of a sparse layer, each row taken
from the attended table or the whole-context one; equal, entry for entry, to the rows it
picks, and refusing what it cannot build."""

from __future__ import annotations

import pytest
import torch

from freekv_sglang.ops import PageTable
from freekv_sglang.runtime.tables import pick_rows


def _table(rows: list[list[int]]) -> PageTable:
    ptr = torch.zeros(len(rows) + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(torch.tensor([len(r) for r in rows]), 0)
    flat = [x for r in rows for x in r]
    # A capacity past the entries, with stale values, as the table buffers have.
    indices = torch.tensor([*flat, -7, -7], dtype=torch.int32)
    return PageTable(ptr, indices, torch.ones(len(rows), dtype=torch.int32))


def _rows(t: PageTable) -> list[list[int]]:
    ptr = t.kv_indptr.tolist()
    return [t.kv_indices[ptr[i] : ptr[i + 1]].tolist() for i in range(len(ptr) - 1)]


@pytest.mark.parametrize(
    "pick", [[True, False, True, False], [False] * 4, [True] * 4, [False, True, True, True]]
)
def test_picked_rows_are_the_rows_of_their_table(pick: list[bool]) -> None:
    a = [[1, 2, 3], [4], [5, 6], []]
    b = [[10], [11, 12, 13, 14], [], [15, 16]]
    got = pick_rows(pick, _table(a), _table(b), 9)
    want = [ra if p else rb for p, ra, rb in zip(pick, a, b, strict=True)]
    assert _rows(got) == want, pick
    assert got.max_kv_len == 9 and got.kv_indptr.dtype == torch.int32
    assert got.kv_indices.numel() == sum(len(r) for r in want)


def test_pick_refuses_tables_of_other_rows_and_rows_over_the_bound() -> None:
    a, b = _table([[1], [2]]), _table([[3], [4, 5, 6]])
    with pytest.raises(ValueError, match="3 rows picked from tables of 2 and 2"):
        pick_rows([True, True, False], a, b, 9)
    with pytest.raises(ValueError, match="3 entries, over 2"):
        pick_rows([True, False], a, b, 2)
