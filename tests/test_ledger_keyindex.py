"""The transfer-id hash table against a dict: batch inserts (fresh, repeated, already present), rollbacks,
single-key sets and deletes, growth past its first size, and lookups of present and absent keys."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from blazil_ai.ledger.keyindex import KeyIndex

# Few distinct keys and a tiny table, so batches repeat keys, probe runs are long and the table grows.
keys_st = st.lists(st.integers(0, 40).map(lambda i: (i * 0x9E3779B97F4A7C15) % (1 << 64) if i % 7 else i), max_size=24)
op_st = st.tuples(st.sampled_from(["batch", "batch_undo", "set", "del", "lookup"]), keys_st)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(op_st, max_size=30))
def test_key_index_matches_a_dict(ops: list[tuple[str, list[int]]]) -> None:
    ki = KeyIndex(1)
    ref: dict[int, int] = {}
    row = 0
    for kind, keys in ops:
        arr = np.array(keys, dtype=np.uint64)
        if kind in ("batch", "batch_undo"):
            fresh = len(set(keys)) == len(keys) and not any(k in ref for k in keys)
            slots = ki.insert_new(arr, row)
            assert (slots is not None) == fresh, (keys, ref)
            if slots is not None:
                if kind == "batch_undo":
                    ki.rollback(slots)
                else:
                    ref.update({k: row + i for i, k in enumerate(keys)})
                    row += len(keys)
        elif kind == "set":
            for k in keys:
                if k not in ref:
                    ki[k] = row
                    ref[k] = row
                    row += 1
        elif kind == "del":
            for k in keys[:3]:
                if k in ref:
                    del ki[k]
                    del ref[k]
        want = [ref.get(k, -1) for k in keys]
        assert ki.lookup(arr).tolist() == want
        assert [ki.get(k, -1) for k in keys] == want
        assert ki.isdisjoint(arr) == all(w < 0 for w in want)
        assert len(ki) == len(ref)


def test_first_rows_keeps_the_first_row_of_a_repeated_key() -> None:
    keys = np.array([5, 9, 5, 0, 9, 2**64 - 1], dtype=np.uint64)
    ki = KeyIndex()
    ki.insert_first_rows(keys)
    assert ki.lookup(keys).tolist() == [0, 1, 0, 3, 1, 5]
    assert len(ki) == 4


def test_a_batch_grows_the_table_and_keeps_every_key() -> None:
    ki = KeyIndex(4)
    first = len(ki.table)
    keys = np.arange(1, 50_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert ki.insert_new(keys[:20_000], 0) is not None
    assert ki.insert_new(keys[20_000:], 20_000) is not None
    assert len(ki.table) > first and 2 * len(ki) <= len(ki.table)
    assert (ki.lookup(keys) == np.arange(50_000)).all()
    assert ki.insert_new(keys[10:11], 50_000) is None  # already there
    assert (ki.lookup(keys + np.uint64(1)) == -1).all()
