"""The transfer-id index: 64-bit hash key -> row, an open-addressing hash table held in one numpy array.

Each slot is two u64 words, (key, row + 1): 0 in the row word is an empty slot, 2^64 - 1 a deleted one.
Linear probing from ``(key * M) >> (64 - bits)``, at most half the slots in use. A whole batch of keys is
looked up or inserted with array operations, one probe step for all keys per round (a few rounds: at
half load, a probe for a new key takes 2.5 steps on average), so a batch costs a handful of numpy calls
instead of one dict operation per key in Python.

Why it is exact: a slot only ever goes from empty to used (deletion leaves a tombstone), except when an
insert is rolled back, and a rollback empties only slots filled by that same insert, which no older
entry's probe run can pass through. So every used slot is reached from its key's home slot over used
slots only, and the first empty slot on a probe proves the key absent.

The engine sizes the table for its ``capacity`` at start (as it preallocates its transfer rows), so
the table grows, rehashing every key at once, only when the ledger outgrows that.
"""

from __future__ import annotations

import numpy as np

from blazil_ai.ledger.types import preallocate

_M_INT = 0xBF58476D1CE4E5B9
_M = np.uint64(_M_INT)
_EMPTY = 0
_DELETED = (1 << 64) - 1


class KeyIndex:
    """key64 -> row, for the first transfer stored with each key (a later one with the same key is a
    collision the engine keeps apart, by its full id)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._alloc(max(1024, 2 * capacity))
        self.count = 0  # live keys
        self.used = 0  # live keys and tombstones

    def _alloc(self, slots: int) -> None:
        bits = max(10, (slots - 1).bit_length())
        self.table = preallocate((1 << bits, 2), np.uint64)
        # Batch probes gather from the flat view: key of slot s at 2s, its row + 1 at 2s + 1 (one cache line;
        # a 1-D gather is several times faster than gathering rows of the 2-D array).
        self._flat = self.table.reshape(-1)
        self.mask = (1 << bits) - 1
        self._shift = np.uint64(64 - bits)
        self._shift_int = 64 - bits

    def __len__(self) -> int:
        return self.count

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * _M) >> self._shift).astype(np.intp)

    def _home_int(self, k: int) -> int:
        return ((k * _M_INT) & 0xFFFFFFFFFFFFFFFF) >> self._shift_int

    # ------------------------------------------------------------------ one key (the sequential path)

    def _find(self, k: int) -> int:
        """The slot holding ``k``, or -1."""
        t, pos = self.table, self._home_int(k)
        while True:
            r = int(t[pos, 1])
            if r == _EMPTY:
                return -1
            if r != _DELETED and int(t[pos, 0]) == k:
                return pos
            pos = (pos + 1) & self.mask

    def get(self, k: int, default: int | None = None) -> int | None:
        """The row stored for key ``k``."""
        pos = self._find(k)
        return default if pos < 0 else int(self.table[pos, 1]) - 1

    def __contains__(self, k: int) -> bool:
        return self._find(k) >= 0

    def __setitem__(self, k: int, row: int) -> None:
        pos = self._find(k)
        if pos >= 0:
            self.table[pos, 1] = row + 1
            return
        self._reserve(1)
        t, pos = self.table, self._home_int(k)
        while int(t[pos, 1]) != _EMPTY:
            pos = (pos + 1) & self.mask
        t[pos] = (k, row + 1)
        self.count += 1
        self.used += 1

    def __delitem__(self, k: int) -> None:
        pos = self._find(k)
        if pos < 0:
            raise KeyError(k)
        self.table[pos, 1] = _DELETED
        self.count -= 1

    # ------------------------------------------------------------------ a batch of keys

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key (int64), -1 where absent."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        pos = self._home(keys)
        f = self._flat
        while len(todo):
            at = 2 * pos
            r = f[at + 1]
            hit = (f[at] == keys) & (r != _EMPTY) & (r != _DELETED)
            if hit.any():
                out[todo[hit]] = r[hit].astype(np.int64) - 1
            go = (r != _EMPTY) & ~hit
            todo, pos, keys = todo[go], (pos[go] + 1) & self.mask, keys[go]
        return out

    def isdisjoint(self, keys: np.ndarray | list[int]) -> bool:
        """True when none of ``keys`` is in the index."""
        return bool((self.lookup(np.asarray(keys, dtype=np.uint64)) < 0).all())

    def insert_new(self, keys: np.ndarray, start_row: int) -> np.ndarray | None:
        """Add keys[i] -> start_row + i for every i and return the slots filled (for :meth:`rollback`);
        None, with nothing added, if a key is already in the index or repeats within ``keys``."""
        self._reserve(len(keys))
        return self._insert(keys, np.arange(start_row + 1, start_row + 1 + len(keys), dtype=np.uint64))

    def insert_first_rows(self, keys: np.ndarray) -> None:
        """Add keys[i] -> i into an empty index, where a repeated key keeps its first row."""
        uniq, first = np.unique(np.asarray(keys, dtype=np.uint64), return_index=True)
        self._reserve(len(uniq))
        self._insert(uniq, first.astype(np.uint64) + np.uint64(1))

    def _insert(self, keys: np.ndarray, rows_plus_one: np.ndarray) -> np.ndarray | None:
        """The batch insert behind every other (room already reserved): the slots filled, or None with nothing
        added when a key is present or repeats within ``keys``."""
        f = self._flat
        todo = np.arange(len(keys))
        pos = self._home(keys)
        filled: list[np.ndarray] = []
        while len(todo):
            at = 2 * pos
            r = f[at + 1]
            taken = r != _EMPTY
            if (taken & (r != _DELETED) & (f[at] == keys[todo])).any():
                if filled:
                    self.table[np.concatenate(filled)] = 0
                return None
            free = ~taken
            cand, cpos = todo[free], pos[free]
            # Several keys may want one empty slot: each writes its row, the one whose row stays wins.
            want = rows_plus_one[cand]
            f[2 * cpos + 1] = want
            won = f[2 * cpos + 1] == want
            wpos = cpos[won]
            f[2 * wpos] = keys[cand[won]]
            filled.append(wpos)
            lost = ~won
            # The losers look at the same slot again (a repeated key is caught there); the rest move on.
            todo = np.concatenate([todo[taken], cand[lost]])
            pos = np.concatenate([(pos[taken] + 1) & self.mask, cpos[lost]])
        self.count += len(keys)
        self.used += len(keys)
        return np.concatenate(filled) if filled else np.zeros(0, dtype=np.intp)

    def rollback(self, slots: np.ndarray) -> None:
        """Empty the slots :meth:`insert_new` filled (its undo, when nothing was inserted since)."""
        self.table[slots] = 0
        self.count -= len(slots)
        self.used -= len(slots)

    def _reserve(self, extra: int) -> None:
        """Grow (rehashing every live key, dropping tombstones) so that at most half the slots are used."""
        if 2 * (self.used + extra) <= len(self.table):
            return
        live = self.table[(self.table[:, 1] != _EMPTY) & (self.table[:, 1] != _DELETED)]
        self._alloc(4 * (len(live) + extra))  # half used at most, and room to grow as much again
        self.count = self.used = 0
        if len(live):
            self._insert(live[:, 0], live[:, 1])
