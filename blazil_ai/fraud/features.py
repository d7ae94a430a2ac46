"""Request batch -> the fraud model's feature matrix, with velocity features from each account's history.

The velocity columns are those the transaction simulator computes (``tx_count_1h``, ``tx_count_24h``,
``amount_sum_24h``, ``amount_ratio``, ``seconds_since_last``) and come from the account's earlier
transfers. :class:`VelocityWindow` keeps, per debit account, the last ``depth`` transfers (event time
and amount) in a 2-D numpy ring plus all-time count and sum, so a batch's features are a handful of
array operations: no Python loop per transfer. It is maintained alongside the ledger (every transfer
that reaches the ledger is added) and rebuilt from the ledger at start.

Earlier requests of the same account *in the same batch* count as history too (their outcome is not
known yet when the batch is scored), exactly as the simulator counts every earlier transaction.
Counts saturate at ``depth`` transfers within a window, far above normal traffic (the simulator's
card-testing bursts are 6-15).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blazil_ai.errors import ConfigError
from blazil_ai.fraud.types import UNKNOWN_CODE, VOCAB

HOUR, DAY, WEEK = 3600.0, 86400.0, 7 * 86400.0
FIRST_TICKET = float(np.exp(3.4))  # the simulator's "previous mean" for an account's first transaction
DENSE_IDS = 1 << 22
COMPUTED = ("amount", "hour", "is_foreign", "is_new_device", "tx_count_1h", "tx_count_24h", "amount_sum_24h",
            "amount_ratio", "seconds_since_last")


class VelocityWindow:
    """Per-account recent history (ring of ``depth`` transfers) and all-time totals, as numpy arrays."""

    def __init__(self, depth: int = 16, capacity: int = 1024) -> None:
        self.depth = depth
        self.rows: dict[int, int] = {}
        # Account ids below DENSE_IDS map to rows through one array gather instead of a dict lookup each.
        self._dense = np.full(0, -1, dtype=np.int64)
        self._alloc(capacity)
        self.n = 0
        self._plan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _alloc(self, cap: int) -> None:
        self.times = np.full((cap, self.depth), -np.inf)
        self.amounts = np.zeros((cap, self.depth), dtype=np.float32)
        self.head = np.zeros(cap, dtype=np.int64)
        self.count = np.zeros(cap, dtype=np.int64)
        self.total = np.zeros(cap)
        self.last = np.full(cap, -np.inf)

    def _grow(self, need: int) -> None:
        cap = len(self.head)
        if need <= cap:
            return
        old: list[np.ndarray] = [self.times, self.amounts, self.head, self.count, self.total, self.last]
        self._alloc(max(need, 2 * cap))
        grown: list[np.ndarray] = [self.times, self.amounts, self.head, self.count, self.total, self.last]
        for new, o in zip(grown, old):
            new[:cap] = o

    def account_rows(self, accounts: np.ndarray) -> np.ndarray:
        """Row of each account id (new accounts get fresh, empty rows)."""
        accounts = accounts.astype(np.uint64, copy=False)
        dense = self._dense
        small = accounts < len(dense)
        if small.all():
            rows = dense[accounts.astype(np.int64)]
        else:
            get = self.rows.get
            rows = np.fromiter((get(a, -1) for a in accounts.tolist()), dtype=np.int64, count=len(accounts))
        new = rows < 0
        if new.any():
            for i in np.flatnonzero(new).tolist():
                a = int(accounts[i])
                r = self.rows.get(a)
                if r is None:
                    r = self.rows[a] = self.n
                    self.n += 1
                rows[i] = r
            self._grow(self.n)
            top = int(accounts.max())
            if top < DENSE_IDS and top >= len(self._dense):
                grown = np.full(max(top + 1, 2 * len(self._dense)), -1, dtype=np.int64)
                grown[: len(self._dense)] = self._dense
                self._dense = grown
            ids = np.fromiter(self.rows.keys(), dtype=np.uint64, count=len(self.rows))
            vals = np.fromiter(self.rows.values(), dtype=np.int64, count=len(self.rows))
            inside = ids < len(self._dense)
            self._dense[ids[inside].astype(np.int64)] = vals[inside]
        return rows

    def _order(self, rows: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Indices sorting transfers by (account row, time), stable: the batch's own order breaks ties."""
        n = len(rows)
        if n > 1 and not bool((t[1:] >= t[:-1]).all()):
            return np.lexsort((t, rows))
        # Times already in order (the usual stream): sorting by row alone is enough, and a stable sort of
        # 16-bit keys is numpy's radix sort, 20x cheaper than lexsort; otherwise unique keys row * n + index.
        if self.n <= 1 << 16:
            return np.argsort(rows.astype(np.uint16), kind="stable")
        return np.argsort(rows * n + np.arange(n))

    def features(self, rows: np.ndarray, t: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
        """Velocity columns for transfers (account row, event time s, amount) given history and earlier rows."""
        n = len(rows)
        if n == 0:
            return {k: np.zeros(0) for k in COMPUTED[4:]}
        order = self._order(rows, t)
        self._plan = (rows, t, order)
        a, tt, am = rows[order], t[order], amount[order]
        # Stored history: compare each transfer with its account's ring in one (n, depth) operation.
        h_t, h_a = self.times[a], self.amounts[a]
        in_1h = h_t >= (tt - HOUR)[:, None]
        in_24h = h_t >= (tt - DAY)[:, None]
        if float(self.last[a].max()) > float(tt[0] if n == 1 else tt.min()):
            # Some history is later than a request (an out-of-order event time): count only what came before.
            before = h_t <= tt[:, None]
            in_1h &= before
            in_24h &= before
        c1 = _row_counts(in_1h)
        c24 = _row_counts(in_24h)
        np.multiply(h_a, in_24h, out=h_a)  # h_a is a fresh gather: safe to overwrite
        s24 = h_a.sum(1, dtype=np.float64)
        # Earlier transfers of the same account in this batch: one sorted key per (account, time).
        idx = np.arange(n)
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = a[1:] != a[:-1]
        group = np.cumsum(new_group) - 1
        first = np.flatnonzero(new_group)[group]
        t0 = float(tt.min())
        span = float(tt.max()) - t0 + 2 * DAY
        key = group * span + (tt - t0)
        # The first transfer of each account in the batch has no earlier one here (groups are 2 days apart
        # in key space), so only the later ones are searched.
        later = np.flatnonzero(~new_group)
        left24 = idx.copy()
        if len(later):
            kl = key[later]
            c1[later] += later - np.searchsorted(key, kl - HOUR, side="left")
            left24[later] = np.searchsorted(key, kl - DAY, side="left")
            c24 = c24 + idx - left24
        csum = np.concatenate([[0.0], np.cumsum(am)])
        s24 = s24 + csum[idx] - csum[left24]
        prev_in_batch = idx - first
        prev_n = self.count[a] + prev_in_batch
        prev_sum = self.total[a] + csum[idx] - csum[first]
        prev_mean = np.where(prev_n > 0, prev_sum / np.maximum(prev_n, 1), FIRST_TICKET)
        prev_t = np.where(prev_in_batch > 0, np.concatenate([[-np.inf], tt[:-1]]), self.last[a])
        since = np.where(np.isfinite(prev_t), tt - prev_t, WEEK)
        cols = {"tx_count_1h": c1, "tx_count_24h": c24, "amount_sum_24h": s24,
                "amount_ratio": am / np.where(prev_mean > 0, prev_mean, FIRST_TICKET),
                "seconds_since_last": np.clip(since, 0.0, WEEK)}
        out: dict[str, np.ndarray] = {}
        for k, v in cols.items():
            full = np.empty(n)
            full[order] = v
            out[k] = full
        return out

    def add(self, rows: np.ndarray, t: np.ndarray, amount: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Record transfers (that reached the ledger) in their accounts' history (``keep``: only those rows)."""
        plan = self._plan
        if plan is not None and plan[0] is rows and plan[1] is t:
            order = plan[2]  # the sort features() made for this very batch
            if keep is not None:
                order = order[keep[order]]
        else:
            if keep is not None:
                rows, t, amount = rows[keep], t[keep], amount[keep]
            order = self._order(rows, t)
        n = len(order)
        if n == 0:
            return
        a, tt, am = rows[order], t[order], amount[order]
        new_group = np.ones(n, dtype=bool)
        new_group[1:] = a[1:] != a[:-1]
        starts = np.flatnonzero(new_group)
        k = np.arange(n) - starts[np.cumsum(new_group) - 1]
        pos = (self.head[a] + k) % self.depth
        self.times[a, pos] = tt
        self.amounts[a, pos] = am
        ua = a[starts]
        counts = np.diff(np.append(starts, n))
        self.head[ua] += counts
        self.count[ua] += counts
        self.total[ua] += np.add.reduceat(am, starts)
        last_of = np.append(starts[1:], n) - 1
        self.last[ua] = np.maximum(self.last[ua], tt[last_of])


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """True values per row of a C-contiguous (n, depth) bool array (popcount of 8 flags at a time)."""
    n, depth = mask.shape
    if depth % 8 or not mask.flags.c_contiguous:
        return np.count_nonzero(mask, axis=1)
    words = mask.view(np.uint64)
    out = np.bitwise_count(words[:, 0]).astype(np.int64)
    for j in range(1, depth // 8):
        out += np.bitwise_count(words[:, j])
    return out


class FeatureBuilder:
    """Builds the model's float32 matrix from a REQUEST_DTYPE batch, following the model's saved transform."""

    def __init__(self, transform: Any, amount_scale: float = 100.0) -> None:
        if transform is None:
            raise ConfigError("the fraud model has no normalisation file (fraud.norm.json) next to it")
        unknown = [c for c in transform.numeric if c not in COMPUTED]
        if unknown:
            raise ConfigError(f"the fraud model needs numeric features {unknown} that the service does not compute "
                              f"(it computes {list(COMPUTED)})")
        unknown = [c for c in transform.categorical if c not in VOCAB]
        if unknown:
            raise ConfigError(f"the fraud model needs categorical features {unknown}; requests carry {list(VOCAB)}")
        self.transform = transform
        self.amount_scale = amount_scale
        self.n_features = transform.n_features
        self.center = np.asarray(transform.center, dtype=np.float64)
        self.scale = np.asarray(transform.scale, dtype=np.float64)
        self.fill = np.asarray(transform.fill or transform.center, dtype=np.float64)
        # Request code -> column of the one-hot block (the model's __other__ slot for codes it never saw).
        self.onehot: list[tuple[str, np.ndarray]] = []
        col = len(transform.numeric)
        for name in transform.categorical:
            cats = transform.categories[name]
            lut = np.full(256, col + len(cats), dtype=np.int64)
            index = {c: i for i, c in enumerate(cats)}
            for code, value in enumerate(VOCAB[name]):
                if value in index:
                    lut[code] = col + index[value]
            lut[UNKNOWN_CODE] = col + len(cats)
            self.onehot.append((name, lut))
            col += len(cats) + 1

    def build(self, req: np.ndarray, velocity: dict[str, np.ndarray]) -> np.ndarray:
        """The [n, d] float32 matrix for ``req`` with precomputed velocity columns."""
        n = len(req)
        t = req["time"]
        cols = {"amount": req["amount"] / self.amount_scale, "hour": np.floor((t % DAY) / HOUR),
                "is_foreign": req["is_foreign"], "is_new_device": req["is_new_device"], **velocity}
        x = np.empty((len(self.transform.numeric), n))
        for j, name in enumerate(self.transform.numeric):
            x[j] = cols[name]
        bad = ~np.isfinite(x)
        if bad.any():  # cannot come from valid requests; impute rather than fail a whole batch
            x[bad] = np.broadcast_to(self.fill[:, None], x.shape)[bad]
        x -= self.center[:, None]
        x /= self.scale[:, None]
        out = np.zeros((n, self.n_features), dtype=np.float32)
        out[:, : len(self.transform.numeric)] = x.T
        # One-hot through the flat matrix: row offsets + column, cheaper than 2-D fancy indexing.
        flat, base = out.reshape(-1), np.arange(0, n * self.n_features, self.n_features)
        for name, lut in self.onehot:
            flat[base + lut[req[name]]] = 1.0
        return out
